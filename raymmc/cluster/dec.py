"""DEC (Xie, Girshick & Farhadi, ICML 2016) on one view of pre-extracted features, and the
data-parallel-safe training-loop pieces that JECL (``raymmc.cluster.jecl``) reuses.

Pipeline: (denoising) autoencoder pretraining with MSE -> seeded FAISS k-means on the embeddings
initialises the centroids -> minimise KL(P || Q) where the target P is recomputed every
``update_interval`` steps over the WHOLE data set -> stop when the fraction of labels that
changed between two target updates is below ``tol``, or after ``max_iter`` steps.

Data-parallel contract (Ray Train): every worker calls :meth:`DEC.fit` on its local shard with a
torch.distributed-backed :class:`GlobalOps`.  Whole-data-set quantities go through ``ops``:
the soft frequency ``f`` (one K-vector all-reduce per target update), the label-change count, the
k-means sample (``all_gather_cat`` of a per-worker sample) and the number of steps per epoch
(every worker runs the same number of steps, so DDP's collectives stay in lock-step).  The nets
are built identically on every worker from the seed; a caller may wrap them (DDP) through the
``wrap`` hook.  ``on_epoch(dict)`` receives progress (losses, label-change fraction).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.kmeans import kmeans
from raymmc.cluster.losses import global_soft_frequency, kl_div, label_change_fraction, target_distribution
from raymmc.cluster.nets import AutoEncoder, ClusteringHead, Wrap, identity_wrap, resolve_device, seed_everything, unwrap
from raymmc.typed import from_dict

Callback = Callable[[dict], None]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class AEConfig:
    """Autoencoder architecture and pretraining (per view).

    Defaults are ours, measured on the 516-item tuxpaint demo archive (benchmarks/quality.py):
    one hidden layer of 256 units, a 32-d embedding and masking noise 0.4 beat DEC's reference
    d-500-500-2000-10 there (text DEC NMI .55 vs .45; JECL .62 vs .57): a few hundred items
    cannot train 3.5M parameters per view.  ``PAPER_AE`` holds the reference architecture for
    large archives (``{"ae": PAPER_AE}`` / ``{"image_ae": PAPER_AE, "text_ae": PAPER_AE}``).
    """

    hidden: tuple[int, ...] = (256,)
    latent: int = 32
    activation: str = "relu"
    noise: float = 0.4  # masking-noise rate of the denoising AE (DEC: 0.2); 0 = plain AE
    epochs: int = 100  # end-to-end pretraining epochs (DEC pretrained layer-wise, then end-to-end)
    lr: float = 1e-3  # Adam (the Keras/PyTorch ports; DEC's SGD schedule needs ~10^5 steps)
    weight_decay: float = 0.0
    batch_size: int = 256
    init_std: float | None = None  # None: PyTorch default init; 0.01: DEC's Gaussian init


# DEC's reference autoencoder (Xie et al. 2016): d-500-500-2000-10, denoising rate 0.2.
PAPER_AE: dict = {"hidden": (500, 500, 2000), "latent": 10, "noise": 0.2, "epochs": 200}


@dataclass
class ClusterLoopConfig:
    """The self-training (KL) phase."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01  # DEC: SGD lr 0.01, momentum 0.9
    momentum: float = 0.9
    batch_size: int = 256
    # Steps between target updates (each update is one forward pass over the local shard and one
    # K-vector all-reduce); 0 = one pass over the (largest local shard of the) data.  DEC used 140
    # on MNIST; 30 measured as well as 100 and better than one pass (3 steps) on the demo archive.
    update_interval: int = 30
    # Target updates between resumable checkpoints, where the trainer asks for them (Ray Train).
    checkpoint_every: int = 10
    tol: float = 1e-3  # stop when < tol of the labels changed between two target updates
    max_iter: int = 20000  # steps
    min_updates: int = 2  # never stop before this many target updates
    alpha: float = 1.0  # Student-t degrees of freedom


@dataclass
class InitConfig:
    """k-means initialisation of the centroids on the AE embeddings."""

    nredo: int = 20  # restarts, lowest inertia kept
    niter: int = 100
    sample: int = 200_000  # at most this many embeddings gathered over all workers


@dataclass
class DECConfig:
    view: Literal["image", "text", "concat"] = "image"
    # Each view's rows are L2-normalised (as for the k-means baselines) and multiplied by
    # ``input_scale`` ("sqrt_dim" = sqrt(d), which gives entries of unit mean square).
    normalize_input: bool = True
    input_scale: float | Literal["sqrt_dim"] = "sqrt_dim"
    ae: AEConfig = field(default_factory=AEConfig)
    init: InitConfig = field(default_factory=InitConfig)
    cluster: ClusterLoopConfig = field(default_factory=ClusterLoopConfig)
    device: str = "auto"
    use_gpu_kmeans: bool = True


def config_from_dict(cls, d: dict | Any | None):
    """Build a (nested) config dataclass from a plain dict (unknown keys and wrong types raise);
    pass through instances of ``cls``; ``None`` gives the defaults."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    return from_dict(cls, dict(d))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# features


def prepare_features(x: np.ndarray, normalize: bool, scale: float | str) -> np.ndarray:
    """Row-L2-normalise (optionally) and scale a feature matrix; rows of zeros stay zeros."""
    x = np.asarray(x, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = math.sqrt(x.shape[1]) if scale == "sqrt_dim" else float(scale)
    return (x * s).astype(np.float32)


def view_matrix(data: MultiViewData, view: str, normalize: bool, scale: float | str) -> tuple[np.ndarray, np.ndarray]:
    """``(features, has_view)`` for "image", "text" or "concat" (each view prepared, missing
    rows zeros; an item has the concat view when it has at least one of the two)."""
    if view == "image":
        if data.image is None:
            raise ValueError("DEC view 'image' but the data has no image features")
        return prepare_features(data.image, normalize, scale) * data.has_image[:, None], data.has_image.copy()
    if view == "text":
        if data.text is None:
            raise ValueError("DEC view 'text' but the data has no text features")
        return prepare_features(data.text, normalize, scale) * data.has_text[:, None], data.has_text.copy()
    if view == "concat":
        parts, has = [], np.zeros(len(data), dtype=bool)
        for arr, m in ((data.image, data.has_image), (data.text, data.has_text)):
            if arr is not None:
                parts.append(prepare_features(arr, normalize, scale) * m[:, None])
                has |= m
        if not parts:
            raise ValueError("no view available")
        return np.concatenate(parts, axis=1).astype(np.float32), has
    raise ValueError(f"unknown view {view!r}")


# --------------------------------------------------------------------------------------------
# data-parallel-safe loop helpers


def global_max_int(value: int, ops: GlobalOps) -> int:
    gathered = ops.all_gather_cat(torch.tensor([int(value)], dtype=torch.int64))
    return int(gathered.max())


def steps_per_epoch(n_local: int, batch_size: int, ops: GlobalOps) -> int:
    """Same on every worker: one pass over the largest local shard."""
    return max(1, math.ceil(global_max_int(n_local, ops) / batch_size))


class BatchSampler:
    """Endless shuffled mini-batches of local row indices (reshuffled after every pass);
    an empty shard yields empty batches so that its worker still takes part in every step."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.bs, self.g = n, batch_size, generator
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self.n == 0:
            return torch.empty(0, dtype=torch.int64)
        out = []
        need = min(self.bs, max(self.n, 1))
        while need > 0:
            if self._pos >= len(self._perm):
                self._perm = torch.randperm(self.n, generator=self.g)
                self._pos = 0
            take = self._perm[self._pos:self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)


def gather_sample(z: torch.Tensor, max_total: int, ops: GlobalOps, generator: torch.Generator) -> torch.Tensor:
    """A random sample of at most ``max_total`` rows of ``z`` over all workers (all_gather_cat)."""
    per_worker = max(1, math.ceil(max_total / max(ops.world_size, 1)))
    if len(z) > per_worker:
        idx = torch.randperm(len(z), generator=generator)[:per_worker]
        z = z[idx.sort().values]
    return ops.all_gather_cat(z.detach().float().cpu().contiguous())


def kmeans_init(z_local: torch.Tensor, k: int, cfg: InitConfig, ops: GlobalOps, seed: int,
                generator: torch.Generator, use_gpu: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """FAISS k-means (seeded, ``nredo`` restarts) on a gathered sample of the embeddings; the
    centroids of rank 0 are broadcast.  Returns ``(centroids (k, d) float32 cpu, sample labels)``."""
    sample = gather_sample(z_local, cfg.sample, ops, generator)
    cent, labels, _ = kmeans(sample.numpy(), k, seed=seed, niter=cfg.niter, nredo=cfg.nredo, use_gpu=use_gpu)
    cent_t = ops.broadcast(torch.from_numpy(cent), src=0)
    return cent_t, labels


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    was = encoder.training
    encoder.eval()
    out = [encoder(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    encoder.train(was)
    if not out:
        linears = [m for m in unwrap(encoder).modules() if isinstance(m, nn.Linear)]
        return torch.zeros(0, linears[-1].out_features if linears else 0)
    return torch.cat(out)


def make_optimizer(params, kind: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def pretrain_autoencoder(model: nn.Module, x: torch.Tensor, cfg: AEConfig, ops: GlobalOps, generator: torch.Generator,
                         device: torch.device, on_epoch: Callback | None = None, tag: str = "pretrain") -> list[float]:
    """MSE (denoising) autoencoder training on the local rows ``x``; ``model(x) -> (z, x_rec)``.

    ``model`` may be DDP-wrapped; every worker runs the same number of steps.  Returns the
    per-epoch global mean losses."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(len(x), cfg.batch_size, ops)
    sampler = BatchSampler(len(x), cfg.batch_size, generator)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        tot = torch.zeros(2, dtype=torch.float64)
        for _ in range(steps):
            xb = x[sampler.next()].to(device)
            _, rec = model(xb)
            loss = nn.functional.mse_loss(rec, xb) if len(xb) else rec.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += torch.tensor([float(loss.detach()) * len(xb), len(xb)], dtype=torch.float64)
        tot = ops.all_reduce_sum(tot)
        history.append(float(tot[0] / max(float(tot[1]), 1.0)))
        if on_epoch is not None:
            on_epoch({"phase": tag, "epoch": epoch, "loss": history[-1]})
    return history


# --------------------------------------------------------------------------------------------
# DEC


def dec_cluster_loop(head: nn.Module, x: torch.Tensor, cfg: ClusterLoopConfig, ops: GlobalOps,
                     generator: torch.Generator, device: torch.device, on_epoch: Callback | None = None) -> dict:
    """DEC's self-training phase on local rows ``x``; ``head(x) -> (z, q)`` (maybe DDP-wrapped).

    Returns a summary (steps, target updates, last label-change fraction, stopped by tol?)."""
    inner = unwrap(head)
    params = list(head.parameters())
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum)
    steps_epoch = steps_per_epoch(len(x), cfg.batch_size, ops)
    interval = cfg.update_interval or steps_epoch
    sampler = BatchSampler(len(x), cfg.batch_size, generator)
    p = None
    last_labels = None
    delta = 1.0
    updates = 0
    run_loss = torch.zeros(2, dtype=torch.float64)
    converged = False
    step = 0
    for step in range(cfg.max_iter):
        if step % interval == 0:
            with torch.no_grad():
                inner.eval()
                q_all = _soft_all(inner, x, device)
                inner.train()
                f = global_soft_frequency(q_all, ops)
                p = target_distribution(q_all, f)
                labels = q_all.argmax(1)
                delta = label_change_fraction(labels, last_labels, ops)
                last_labels = labels
            tot = ops.all_reduce_sum(run_loss)
            if on_epoch is not None:
                on_epoch({"phase": "cluster", "step": step, "update": updates,
                          "loss": float(tot[0] / max(float(tot[1]), 1.0)) if updates else float("nan"),
                          "delta_label": delta})
            run_loss.zero_()
            updates += 1
            if updates > cfg.min_updates and delta < cfg.tol:
                converged = True
                break
        idx = sampler.next()
        xb = x[idx].to(device)
        _, q = head(xb)
        loss = kl_div(p[idx].to(device), q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += torch.tensor([float(loss.detach()) * len(idx), len(idx)], dtype=torch.float64)
    return {"steps": step, "updates": updates, "delta_label": delta, "converged": converged}


@torch.no_grad()
def _soft_all(head: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    out = [head(x[i:i + batch_size].to(device))[1].cpu() for i in range(0, len(x), batch_size)]
    if not out:
        return torch.zeros(0, head.centroids.shape[0])
    return torch.cat(out)


class DEC(Clusterer):
    """Deep Embedded Clustering on one view ("image", "text") or on both views concatenated."""

    def __init__(self, n_clusters: int, config: DECConfig | dict | None = None, seed: int = 0,
                 on_epoch: Callback | None = None, wrap: Wrap | None = None):
        self.n_clusters = int(n_clusters)
        self.config: DECConfig = config_from_dict(DECConfig, config)
        self.seed = int(seed)
        self.on_epoch = on_epoch
        self.wrap = wrap or identity_wrap
        self.autoencoder: AutoEncoder | None = None
        self.head: ClusteringHead | None = None
        self.history: dict[str, Any] = {}

    # -- building blocks, usable separately by a distributed trainer --------------------------
    def _features(self, data: MultiViewData) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return view_matrix(data, c.view, c.normalize_input, c.input_scale)

    def build_autoencoder(self, in_dim: int) -> AutoEncoder:
        a = self.config.ae
        return AutoEncoder(in_dim, a.hidden, a.latent, a.activation, a.noise, a.init_std)

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "DEC":
        c = self.config
        device = resolve_device(c.device)
        gen = seed_everything(self.seed)
        feats, has = self._features(data)
        x = torch.from_numpy(feats[has])
        t0 = time.time()
        resume = self.resume_state or {}
        ae = self.build_autoencoder(feats.shape[1]).to(device)
        if resume.get("phase") == "pretrained":
            ae.load_state_dict(resume["autoencoder"])
            self.history["pretrain_loss"] = list(resume["pretrain_loss"])
            self.history["resumed_from"] = "pretrained"
            if ops.world_size == 1:  # one process: continue its random streams, as if never interrupted
                gen.set_state(resume["rng"]["generator"])
                torch.set_rng_state(resume["rng"]["torch"])
        else:
            self.history["pretrain_loss"] = pretrain_autoencoder(self.wrap(ae), x, c.ae, ops, gen, device,
                                                                 self.on_epoch)
            if self.checkpoint_fn is not None:
                self.checkpoint_fn(copy.deepcopy({
                    "phase": "pretrained", "autoencoder": ae.state_dict(),
                    "pretrain_loss": self.history["pretrain_loss"],
                    "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()}}))
        z = encode(ae.encoder, x, device)
        cent, _ = kmeans_init(z, self.n_clusters, c.init, ops, self.seed, gen, c.use_gpu_kmeans)
        head = ClusteringHead(ae.encoder, cent, c.cluster.alpha).to(device)
        self.history["cluster"] = dec_cluster_loop(self.wrap(head), x, c.cluster, ops, gen, device, self.on_epoch)
        self.history["seconds"] = time.time() - t0
        self.autoencoder, self.head = ae, head
        head.eval()
        return self

    def _check(self) -> ClusteringHead:
        if self.head is None:
            raise RuntimeError("DEC is not fitted")
        return self.head

    def embed(self, data: MultiViewData) -> np.ndarray:
        head = self._check()
        feats, _ = self._features(data)
        dev = next(head.parameters()).device
        return encode(head.encoder, torch.from_numpy(feats), dev).numpy()

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        """Items without the view get a uniform row."""
        head = self._check()
        feats, has = self._features(data)
        dev = next(head.parameters()).device
        head.eval()
        q = _soft_all(head, torch.from_numpy(feats), dev).numpy().astype(np.float64)
        q[~has] = 1.0 / self.n_clusters
        return q

    def state_dict(self) -> dict[str, Any]:
        head = self._check()
        return {"kind": "dec", "n_clusters": self.n_clusters, "seed": self.seed,
                "config": config_to_dict(self.config), "in_dim": self.autoencoder.in_dim,
                "autoencoder": {k: v.detach().cpu() for k, v in self.autoencoder.state_dict().items()},
                "centroids": head.centroids.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_clusters = int(state["n_clusters"])
        self.seed = int(state["seed"])
        self.config = config_from_dict(DECConfig, state["config"])
        device = resolve_device(self.config.device)
        ae = self.build_autoencoder(int(state["in_dim"]))
        ae.load_state_dict(state["autoencoder"])
        self.autoencoder = ae.to(device)
        self.head = ClusteringHead(ae.encoder, torch.as_tensor(state["centroids"]), self.config.cluster.alpha).to(device)
        self.head.eval()
