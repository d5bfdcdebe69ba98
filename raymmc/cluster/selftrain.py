"""The one self-training loop (DEC and JECL): sharpen soft assignments towards a target distribution.

Every ``update_interval`` global steps the target ``p`` is recomputed over the whole local shard from
the current weights (its whole-data-set part, the soft cluster frequency, all-reduced), and the
fraction of items whose label changed since the last update is counted over all workers; the loop
stops once that fraction is below ``tol`` (after ``min_updates`` updates) or after ``max_iter`` steps.
Between updates each step minimises the algorithm's loss on one batch of the lock-step sampler.

A checkpoint is taken right after a target update, so a resumed loop recomputes exactly that update's
target and labels from the checkpointed weights instead of storing per-item state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from torch import nn

from raymmc.cluster.base import GlobalOps, MultiViewData
from raymmc.cluster.checkpoint import Phase, Resume
from raymmc.cluster.deep import DeepClusterer
from raymmc.cluster.kmeans import InitConfig, init_centroids
from raymmc.cluster.lloyd import item_keys
from raymmc.cluster.losses import label_change_fraction
from raymmc.cluster.nets import forward_in_batches
from raymmc.cluster.pretrain import AEConfig, pretrain_autoencoder
from raymmc.cluster.sampler import EpochSampler, steps_per_epoch
from raymmc.hashing import mix64


@dataclass
class SelfTrainingConfig:
    """The self-training (KL) phase."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01  # DEC: SGD lr 0.01, momentum 0.9
    momentum: float = 0.9
    batch_size: int = 256
    # Steps between target updates (each update is one forward pass over the local shard and one
    # K-vector all-reduce); 0 = one epoch. DEC used 140 on MNIST; 30 measured as well as 100 and
    # better than one epoch (3 steps) on the demo archive.
    update_interval: int = 30
    # Target updates between resumable checkpoints, where the trainer asks for them (Ray Train); 0 = none
    # inside the loop (the phase-end checkpoints remain).
    checkpoint_every: int = 10
    tol: float = 1e-3  # stop when < tol of the labels changed between two target updates
    max_iter: int = 20000  # steps
    min_updates: int = 2  # never stop before this many target updates
    alpha: float = 1.0  # Student-t degrees of freedom


@dataclass
class SelfTrainingModelConfig:
    """What DEC and JECL share: input preparation, initialisation, the loop, execution."""

    # Each view's rows are L2-normalised (as for the k-means baselines) and multiplied by
    # ``input_scale`` ("sqrt_dim" = sqrt(d): entries of unit mean square, which the AE's default init
    # and learning rate suit).
    normalize_input: bool = True
    input_scale: float | Literal["sqrt_dim"] = "sqrt_dim"
    init: InitConfig = field(default_factory=InitConfig)
    cluster: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    device: str = "auto"  # "auto": cuda when available
    use_gpu_kmeans: bool = True  # FAISS on the GPU where faiss has GPUs
    eval_batch_size: int = 4096  # rows per forward pass outside training: bounds memory, not results
    # Training arithmetic. float32 is the speed default; float64 makes the fit the same for any number
    # of data-parallel workers (their gradients are summed in a different order, and float32's rounding,
    # amplified by pretraining, moved 1-vs-2-worker JECL to .95-.99 NMI; docs/results.md). The
    # networks are small MLPs, so on a CPU float64 costs about 2x; on a GPU it depends on its FP64 rate.
    precision: Literal["float32", "float64"] = "float32"


@dataclass
class LoopState:
    """Counters of the loop; ``updates > 0`` means the target update at ``step`` has been done."""

    step: int = 0
    updates: int = 0
    delta: float = 1.0  # label-change fraction at the last update
    converged: bool = False


class Objective(Protocol):
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p, labels)`` over the local shard from the current weights (eval mode, no randomness)."""

    def loss(self, idx: np.ndarray, p: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
        """The loss terms of the batch ``idx`` (``"loss"`` is minimised); ``p`` the whole local target; every
        per-row (batch-mean) term multiplied by ``weight`` (the sampler's: under DDP the mean of the workers'
        gradients is then the global batch mean's), terms of global-batch statistics not."""


def make_optimizer(params, cfg: SelfTrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def self_train(objective: Objective, optimizer: torch.optim.Optimizer, sampler: EpochSampler,
               cfg: SelfTrainingConfig, ops: GlobalOps, state: LoopState, *,
               report: Callable[[dict[str, Any]], None], checkpoint: Callable[[LoopState], None]) -> LoopState:
    """Run (or continue, from ``state``) the loop; returns the final counters."""
    interval = cfg.update_interval or sampler.steps
    p, last = objective.targets() if state.updates else (None, None)
    sums: dict[str, float] = {}
    rows = 0
    step = state.step
    while step < cfg.max_iter:
        if step % interval == 0 and not (state.updates and step == state.step):
            p, labels = objective.targets()
            state.delta = label_change_fraction(labels, last, ops)
            last = labels
            keys = sorted(sums)
            tot = ops.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [rows], dtype=torch.float64))
            report({"phase": "self_training", "step": step, "update": state.updates, "delta_label": state.delta,
                    **{k: float(tot[i] / max(float(tot[-1]), 1.0)) for i, k in enumerate(keys)}})
            sums, rows = {}, 0
            state.updates += 1
            state.step = step
            if state.updates > cfg.min_updates and state.delta < cfg.tol:
                state.converged = True
                return state
            if cfg.checkpoint_every and state.updates % cfg.checkpoint_every == 0:
                checkpoint(LoopState(**asdict(state)))
        idx = sampler.next()
        terms = objective.loss(idx, p, sampler.weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        # x sampler.rows (this worker's share of the global batch): summed over workers and steps and divided
        # by the rows, each term is its mean over the interval, per-row and global-batch terms alike
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * sampler.rows
        rows += sampler.rows
        step += 1
    state.step = step
    return state


class SelfTrainingClusterer(DeepClusterer):
    """The estimator template of DEC and JECL: pretrain the autoencoders, initialise the centroids by
    k-means on the embeddings, self-train; a checkpoint at the end of each phase and every
    ``checkpoint_every`` target updates. A warm start (``warm_start``: a previous fit's state) skips the
    pretraining and the initialisation: self-training continues from the previous network.

    A subclass says what its rows, autoencoders, initial network and objective are; the fitted
    network is ``net_`` (encoders and centroids), its input widths ``dims_``."""

    supports_warm_start = True

    # -- what a subclass provides --------------------------------------------------------------
    def _rows(self, data: MultiViewData) -> dict[str, torch.Tensor]:
        """The training tensors; ``rows["n"]``-style counts come from their lengths."""
        raise NotImplementedError

    def _autoencoders(self, dims: list[int]) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _pretrain_sets(self, rows: dict[str, torch.Tensor]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, AEConfig]]:
        """view name -> (a tensor of the training rows, a bool mask of the rows that view pretrains on or None
        for all, its AEConfig); names match :meth:`_autoencoders`."""
        raise NotImplementedError

    def _initialise(self, aes: dict[str, nn.Module], rows: dict[str, torch.Tensor], ops: GlobalOps) -> nn.Module:
        raise NotImplementedError

    def _empty_net(self, dims: list[int]) -> nn.Module:
        """A network of the fitted shape (weights to be loaded)."""
        raise NotImplementedError

    def _objective(self, net: nn.Module, rows: dict[str, torch.Tensor], ops: GlobalOps) -> Objective:
        raise NotImplementedError

    def _fitted_extra(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        return None

    # -- the template ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.config.precision]

    def _fit(self, data: MultiViewData, ops: GlobalOps, resume: Resume | None) -> None:
        rows = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in self._rows(data).items()}
        n_local = len(next(iter(rows.values())))
        # batches, masking noise and the k-means sample keyed by item: the same for any worker count
        rows["key"] = torch.from_numpy(self.streams.row_keys(self._items(data)).view(np.int64))
        loop, opt_state = self._start(rows, ops, resume)
        cfg = self.config.cluster
        net = self.wrap(self.net_.train())
        opt = make_optimizer(net.parameters(), cfg)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        sampler = self.streams.sampler("self_training", n_local, steps_per_epoch(n_local, cfg.batch_size, ops),
                                       keys=self.row_keys(rows["key"]), ops=ops)

        def save(state: LoopState) -> None:
            self._checkpoint(Phase.SELF_TRAINING, ops, {"model": self.state_dict(), "loop": asdict(state),
                                                        "optimizer": opt.state_dict()})

        loop = self_train(self._objective(net, rows, ops), opt, sampler, cfg, ops, loop, report=self._report,
                          checkpoint=save)
        self.n_iter_, self.converged_ = loop.step, loop.converged
        self.net_.eval()
        usable = self.usable(data)
        self.labels_ = np.full(len(data), -1, dtype=np.int64)
        self.labels_[usable] = self.predict(data.subset(np.flatnonzero(usable)))

    def _start(self, rows: dict[str, torch.Tensor], ops: GlobalOps, resume: Resume | None
               ) -> tuple[LoopState, dict[str, Any] | None]:
        """``net_`` ready for self-training, from a warm start, from scratch (pretrain, initialise) or from a
        resume record; returns the loop counters and optimizer state to continue with."""
        phase = resume.phase if resume is not None else None
        if resume is None and self.warm_start is not None:  # the previous fit's network: straight to the loop
            self._load_warm_start(self.warm_start, rows)
            loop, opt_state = LoopState(), None
            self._report({"phase": "warm_start"})
            self._checkpoint(Phase.INITIALISED, ops, {"model": self.state_dict(), "loop": asdict(loop)})
        elif phase in (None, Phase.PRETRAINED):
            self.dims_ = [int(t.shape[1]) for t in rows.values() if t.ndim == 2]
            with self._seeded_weights():
                aes = {k: v.to(self.device, self.dtype) for k, v in self._autoencoders(self.dims_).items()}
            if phase is None:
                self._pretrain(aes, rows, ops)
                self._checkpoint(Phase.PRETRAINED, ops, {"autoencoders": {k: v.state_dict() for k, v in aes.items()}})
            else:
                for k, v in aes.items():
                    v.load_state_dict(resume.state["autoencoders"][k])
            self.net_ = self._initialise(aes, rows, ops).to(self.device, self.dtype)
            loop, opt_state = LoopState(), None
            self._checkpoint(Phase.INITIALISED, ops, {"model": self.state_dict(), "loop": asdict(loop)})
        else:
            self.load_state_dict(resume.state["model"])
            loop, opt_state = LoopState(**resume.state["loop"]), resume.state.get("optimizer")
        return loop, opt_state

    def _load_warm_start(self, state: dict[str, Any], rows: dict[str, torch.Tensor]) -> None:
        """The previous fit's network (its encoders and centroids), this fit's own config and seed kept."""
        self._check_warm_start(state)
        config, seed = self.config, self.seed
        self.load_state_dict(state)
        self.config, self.seed = config, seed
        dims = [int(t.shape[1]) for t in rows.values() if t.ndim == 2]
        if dims != self.dims_:
            raise ValueError(f"warm start from a model of input widths {self.dims_}, these features have {dims}")
        self.net_ = self.net_.to(self.device, self.dtype)

    def warm_start_signature(self) -> dict[str, Any]:
        """The autoencoders' shapes, the view(s) and the input preparation (not the training schedule)."""
        c, shape = self.config, ("hidden", "latent", "activation")
        out = {k: getattr(c, k) for k in ("view", "normalize_input", "input_scale") if hasattr(c, k)}
        for name in ("ae", "image_ae", "text_ae"):
            if hasattr(c, name):
                out[name] = {k: getattr(getattr(c, name), k) for k in shape}
        return out

    def _items(self, data: MultiViewData) -> np.ndarray:
        """The stable keys (ids, else global row index) of the training rows, in ``_rows``' order."""
        return item_keys(data.ids, data.extra.get("index"), len(data))

    @staticmethod
    def row_keys(key: torch.Tensor) -> np.ndarray:
        """``rows["key"]`` (or a subset of it) back to uint64."""
        return key.numpy().view(np.uint64)

    def _pretrain(self, aes: dict[str, nn.Module], rows: dict[str, torch.Tensor], ops: GlobalOps) -> None:
        for view, (x, mask, a) in self._pretrain_sets(rows).items():
            key = rows["key"]
            if mask is not None:
                x, key = x[mask], key[mask]
            sampler = self.streams.sampler(f"pretrain_{view}", len(x), steps_per_epoch(len(x), a.batch_size, ops),
                                           keys=self.row_keys(key), ops=ops)
            pretrain_autoencoder(self.wrap(aes[view]), x, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                                 sampler=sampler, ops=ops, device=self.device, report=self._report, view=view)

    def _embed_rows(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward_in_batches(encoder, x, device=self.device, batch_size=self.config.eval_batch_size)[0]

    def _init_kmeans(self, z: torch.Tensor, key: torch.Tensor, ops: GlobalOps, index: int = 0) -> torch.Tensor:
        """k-means centroids of the embeddings ``z`` of the rows ``key`` (a subset of ``rows["key"]``)."""
        c = self.config
        salt = np.uint64(self._kmeans_seed(index))
        return init_centroids(z, self.n_clusters, c.init, ops, seed=self._kmeans_seed(index),
                              priority=mix64(self.row_keys(key) ^ salt), use_gpu=c.use_gpu_kmeans)

    def _check_fitted(self) -> nn.Module:
        return self._fitted("net_")

    def state_dict(self) -> dict[str, Any]:
        net = self._check_fitted()
        return {**self._header(), "dims": list(self.dims_), "net": self._net_state(net), **self._fitted_extra()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read_header(state)
        self.dims_ = [int(d) for d in state["dims"]]
        with self._seeded_weights():  # its throw-away initial weights must not draw on the fit's streams
            net = self._empty_net(self.dims_).to(self.dtype)  # before loading: load_state_dict keeps dtypes
        net.load_state_dict(state["net"])
        self.net_ = net.to(self.device).eval()
        self._load_extra(state)
