"""MMDC: Multi-Modal Deep Clustering (Shiran & Weinshall, ICPR 2020), trained end-to-end on pixels.

The method (``/work/shared/ALGORITHMS.md``, MMDC section):

* **Fixed targets.** ``n`` unit vectors are drawn once from a Gaussian mixture in R^d with ``K`` means
  (``sigma`` the per-coordinate standard deviation, each sample L2-normalised). Item ``i`` owns the target in row
  ``i`` of a target table. Training only *permutes* rows of that table, so the multiset of targets - and with it
  the number of items per mixture component (the balance prior) - never changes. ``sigma = 0`` with ``d = K``
  and one-hot means is what the public code runs by default (its ``--sigma`` defaults to 0): the targets are then
  the one-hot rows of ``eye(K)``, ``n / K`` of each.
* **Per mini-batch.** (1) Predict the batch's un-augmented view with the network in eval mode; cost = euclidean
  distance between predictions and the batch's targets; the linear assignment (Hungarian) of that cost permutes
  the targets within the batch. (2) One SGD step on an augmented view of the same images, MSE between the
  L2-normalised outputs and the (newly assigned) targets.
* **Auxiliary rotation task.** Once per epoch, a pass over the data where every image is shown rotated by 0, 90,
  180 and 270 degrees and a linear head on the shared features predicts which (cross-entropy). ``rotation_copies
  = 1`` shows each image at one random angle instead (a quarter of the cost; ours).
* **Late refinement.** From ``refine_epoch`` on, at the start of each epoch: k-means (K clusters) on the outputs,
  the new clusters matched one-to-one to the targets' current clusters (linear assignment on the co-occurrence
  counts), and every item's target := the mean of its matched component. The per-batch re-assignment is then
  switched off (as in the public code); the cluster sizes are now k-means', so the fixed-set property holds up to
  ``refine_epoch`` only. ``refine_init`` picks the k-means start (see :class:`MMDCConfig`).
* **Final label.** The nearest mixture mean to the network's output.

Data parallelism. The target table is global state indexed by a *global* item index (``data.extra["index"]`` or
``arange(n)``): every worker keeps the whole table (n x d floats). After each local Hungarian step the worker's
``(index, source index)`` pairs are concatenated over workers with ``ops.all_gather_cat`` and every worker applies
all of them, so the tables stay identical (batches of different workers are disjoint, and each permutation stays
inside one batch). Workers take the same number of steps per pass (the lock-step sampler of
``raymmc.cluster.sampler``: near-equal batches of each worker's own items). The network may be wrapped by the caller through ``wrap`` (e.g.
``lambda m: DistributedDataParallel(m, find_unused_parameters=True)``; the clustering and the rotation steps each
use one head only). Refinement gathers the outputs with ``all_gather_cat`` and rank 0's new table is broadcast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn

from raymmc.cluster.assignment import linear_assignment, match_mapping
from raymmc.cluster.backbones import build_backbone
from raymmc.cluster.base import GlobalOps, MultiViewData
from raymmc.cluster.checkpoint import Phase, Resume
from raymmc.cluster.deep import DeepClusterer
from raymmc.cluster.kmeans import NearestCentroid, kmeans
from raymmc.cluster.nets import broadcast_buffers
from raymmc.cluster.sampler import EpochSampler, check_min_batch, steps_per_epoch
from raymmc.cluster.seeding import Stream, derive_seed

@dataclass
class MMDCConfig:
    """Hyper-parameters. Defaults: the paper's optimiser (SGD lr .05, momentum .9, weight decay 5e-4, batch 128),
    the public code's target mixture (sigma 0, d = K, one-hot means), its MNIST schedule and views (50 epochs,
    lr x0.1 at epoch 40, crops 24/20/16 + +-25 degrees) but refinement from epoch 44 rather than 20 (see
    :meth:`preset`), and the paper's rotation head. Use :meth:`preset` for the measured per-data-set recipes."""

    # targets
    sigma: float = 0.0  # std of each mixture component (0: every target is exactly its component's mean)
    target_dim: int | None = None  # d; None = n_clusters
    means: Literal["one_hot", "random"] = "one_hot"  # one_hot needs d >= K; random = normalised Gaussian means
    # network
    backbone: Literal["auto", "convnet", "resnet18"] = "auto"  # auto: convnet if min(H, W) <= 32 and C == 1
    convnet_widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of the small ConvNet's four stages
    # "default" (PyTorch's Linear init) or "small" (N(0, .01), the public code): see backbones._init_heads
    head_init: Literal["default", "small"] = "default"
    rotation: bool = True  # auxiliary rotation head and its one pass per epoch
    rotation_weight: float = 1.0  # scale of the rotation cross-entropy
    # 4: every image of the pass is shown at all four angles (public code); 1: at one random angle (4x cheaper)
    rotation_copies: Literal[1, 4] = 4
    # optimisation
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to 1-D parameters (BatchNorm, biases), as in the public code
    lr_milestones: tuple[int, ...] = (40,)
    lr_gamma: float = 0.1
    refine_epoch: int | None = 44  # None: no refinement
    checkpoint_every: int = 5  # epochs between resumable checkpoints, when a trainer asks for them
    # k-means of the refinement: "restarts" = seeded FAISS k-means with ``kmeans_nredo`` random restarts (the public
    # code uses scikit-learn's k-means++ with restarts); "targets" = Lloyd iterations warm-started from the mean
    # output of each current target component; "best" = whichever of the two has the lower inertia. FAISS's random
    # init can land in a poor optimum (seen on MNIST-5k: inertia 971 vs 651, ACC .85 vs .95), which the
    # refinement then locks in; "best" keeps k-means' objective and guards against that.
    refine_init: Literal["best", "restarts", "targets"] = "best"
    kmeans_nredo: int = 5
    kmeans_niter: int = 100
    # views. Un-augmented view: centre crop ``eval_crop`` (None: whole image), resize to ``input_size``.
    # Augmented view: [colour jitter (.4,.4,.4,.125) + grayscale p] (3-channel images only) -> [h-flip] ->
    # [rotation +-rotate_degrees] -> random crop of a size drawn from ``crop_sizes`` (or a RandomResizedCrop with
    # ``resized_crop_scale``) -> resize to ``input_size``.
    input_size: int | None = None  # None: the images' own size
    eval_crop: int | None = 24
    crop_sizes: tuple[int, ...] | None = (24, 20, 16)
    resized_crop_scale: tuple[float, float] | None = None  # used instead of crop_sizes when set
    rotate_degrees: float = 25.0
    flip: bool = False
    color_jitter: bool = False
    grayscale_p: float = 0.2
    intensity_jitter: float = 0.0  # brightness and contrast jitter of this strength, any channel count (ours)
    # execution
    eval_batch_size: int = 512  # images per forward pass outside training: bounds memory, not results
    device: str = "auto"  # "auto": cuda when available, else cpu
    channels_last: bool = True

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MMDCConfig":
        """Per-data-set recipes (``overrides`` replace single fields).

        * ``mnist``: the public code's MNIST command - small ConvNet, no rotation head, 50 epochs, lr x0.1 at 40,
          crops 24/20/16 of the 28x28 image resized back, +-25 degree rotations, centre crop 24 as the un-augmented
          view, no flip (digits are not mirror-symmetric) - except that refinement starts at epoch 44, not 20: on
          MNIST-5k an epoch is 40 steps (547 on the full 70k), and refining at 20 froze immature partitions.
          Measured on MNIST-5k, 5 seeds, ACC: refine at 20 .865 +- .088; at 44 .912 +- .074; at 44 with the
          ceil-mode ConvNet and the default head init (now the defaults) .953 +- .038.
        * ``fashion-mnist`` (ours): flips (label-preserving for clothing), milder crops 26/24/22 since garments fill
          the frame, centre crop 26 as the un-augmented view, +-10 degrees, the rotation head (one random angle per
          image per pass), and the CIFAR recipe's proportions of the schedule: 40 epochs, lr x0.2 at 75%,
          refinement from 87.5%.
        * ``cifar10``: the public CIFAR-10 command - ResNet-18, 400 epochs, lr x0.2 at 300, refinement at 350,
          crop 20 of 32 resized to 32 (centre crop 20 as the un-augmented view), flip, colour jitter, rotation head
          (all four angles).
        """
        base: dict[str, Any]
        if name in ("mnist", "mnist-5k"):
            base = dict(backbone="convnet", rotation=False)
        elif name == "fashion-mnist":
            base = dict(backbone="convnet", crop_sizes=(26, 24, 22), eval_crop=26, rotate_degrees=10.0,
                        flip=True, rotation=True, rotation_copies=1, epochs=40, lr_milestones=(30,), lr_gamma=0.2,
                        refine_epoch=35)
        elif name in ("cifar10", "cifar"):
            base = dict(backbone="resnet18", epochs=400, lr_milestones=(300,), lr_gamma=0.2, refine_epoch=350,
                        crop_sizes=(20,), eval_crop=20, input_size=32, rotate_degrees=0.0, flip=True,
                        color_jitter=True)
        else:
            raise ValueError(f"unknown MMDC preset {name!r}")
        base.update(overrides)
        return cls(**base)


class GaussianMixtureTargets:
    """The fixed target set: ``n`` unit vectors from a K-component mixture in R^d, exactly ``n // K`` (+1 for the
    first ``n % K`` components) per component, in random order."""

    def __init__(self, k: int, dim: int, sigma: float, means: str, seed: int):
        self.k, self.dim, self.sigma = int(k), int(dim), float(sigma)
        rng = np.random.default_rng(derive_seed(seed, Stream.TARGETS))
        if means == "one_hot":
            if dim < k:
                raise ValueError(f"one-hot means need target_dim >= n_clusters ({dim} < {k})")
            mu = np.eye(k, dim)
        elif means == "random":
            mu = rng.standard_normal((k, dim))
        else:
            raise ValueError(f"unknown means init {means!r}")
        self.means = (mu / np.linalg.norm(mu, axis=1, keepdims=True)).astype(np.float32)
        self._rng = rng

    def sample(self, n: int) -> np.ndarray:
        comp = self._rng.permutation(np.arange(n) % self.k)
        y = self.means[comp].astype(np.float64)
        if self.sigma > 0:
            y = y + self.sigma * self._rng.standard_normal(y.shape)
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    def labels(self, y: np.ndarray | torch.Tensor) -> np.ndarray:
        y = torch.as_tensor(y, dtype=torch.float32).cpu()
        return torch.cdist(y, torch.from_numpy(self.means)).argmin(dim=1).numpy()


def assign_targets(pred: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """The permutation of a batch's targets that minimises the summed euclidean distance to the predictions:
    returns ``src`` with prediction ``i`` getting ``targets[src[i]]`` (``src`` is a permutation of
    ``range(b)``)."""
    cost = torch.cdist(pred.float(), targets.float()).cpu().numpy()
    rows, cols = linear_assignment(cost)
    src = np.empty(len(rows), dtype=np.int64)
    src[rows] = cols
    return src


def lloyd(z: torch.Tensor, labels: torch.Tensor, k: int, niter: int, device: torch.device | str = "cpu",
          chunk: int = 65536) -> tuple[np.ndarray, float]:
    """k-means (Lloyd) on ``z`` (n, d) started from the centroids of the partition ``labels``; an empty cluster
    keeps its previous centroid. Returns the final labels (n,) int64 and the inertia (sum of squared distances to
    the centroids of the returned partition)."""
    z = z.to(device=device, dtype=torch.float32)
    lab = labels.to(device=device, dtype=torch.int64)
    cent = torch.zeros(k, z.shape[1], device=device)
    for _ in range(max(1, niter)):
        sums = torch.zeros(k, z.shape[1], device=device).index_add_(0, lab, z)
        counts = torch.bincount(lab, minlength=k).to(z.dtype)
        nonempty = counts > 0
        cent[nonempty] = sums[nonempty] / counts[nonempty, None]
        new = torch.cat([torch.cdist(z[i:i + chunk], cent).argmin(dim=1) for i in range(0, len(z), chunk)])
        if torch.equal(new, lab):
            break
        lab = new
    sums = torch.zeros(k, z.shape[1], device=device).index_add_(0, lab, z)
    counts = torch.bincount(lab, minlength=k).to(z.dtype)
    cent = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], cent)
    inertia = float(((z - cent[lab]) ** 2).sum())
    return lab.cpu().numpy(), inertia


def rotation_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``x`` (B, C, H, W) rotated by 0, 90, 180 and 270 degrees (counter-clockwise), as (4B, C, H, W),
    and the labels 0..3 (label r = r * 90 degrees). Needs square images."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("rotation task needs square images")
    views = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)], dim=1)  # (B, 4, C, H, W)
    labels = torch.arange(4, device=x.device).repeat(x.shape[0])
    return views.flatten(0, 1), labels


def random_rotation_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``x`` rotated by one random multiple of 90 degrees (counter-clockwise); labels 0..3."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("rotation task needs square images")
    labels = torch.randint(0, 4, (x.shape[0],), device=x.device)
    out = x.clone()
    for r in range(1, 4):
        sel = labels == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out, labels


def _optimizer(module: nn.Module, cfg: MMDCConfig) -> torch.optim.SGD:
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)


class MMDC(NearestCentroid, DeepClusterer):
    """Multi-Modal Deep Clustering on ``data.pixels`` ((n, C, H, W) uint8).

    Fitted: ``model_`` (the network), ``gmm_`` (the target mixture; ``cluster_centers_`` are its means),
    ``targets_`` ((N_global, d) target table), ``labels_``, ``n_iter_`` (epochs), ``history_``: one record
    per epoch with ``epoch``, ``loss`` (mean clustering MSE), ``rotation_loss`` (mean cross-entropy or
    None), ``changed`` (fraction of items whose target's component changed during the epoch, refinement
    included), ``refining``, ``lr`` and ``seconds`` (also passed to ``on_epoch``). Items without an image
    cannot be assigned (``usable``)."""

    name = "mmdc"
    Config = MMDCConfig
    # A re-clustering starts from the previous network and target mixture (see _load_warm_start).
    supports_warm_start = True

    _shape: tuple[int, int, int] | None = None  # (C, H, W) of the training images

    def uses(self) -> str:
        return "image pixels"

    def usable(self, data: MultiViewData) -> np.ndarray:
        return np.asarray(data.has_image, bool) & (data.pixels is not None)

    @property
    def target_dim(self) -> int:
        return self.config.target_dim or self.n_clusters

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self._fitted("gmm_").means

    # ------------------------------------------------------------------ set-up
    def _input_size(self) -> int:
        assert self._shape is not None
        return self.config.input_size or self._shape[1]

    def _build_model(self) -> nn.Module:
        assert self._shape is not None
        c, h, w = self._shape
        name = self.config.backbone
        if name == "auto":
            name = "convnet" if (c == 1 and min(h, w) <= 32) else "resnet18"
        with self._seeded_weights():
            model = build_backbone(name, in_channels=c, out_dim=self.target_dim, rotation_head=self.config.rotation,
                                   widths=tuple(self.config.convnet_widths), head_init=self.config.head_init)
        model = model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _train_transform(self, channels: int, with_jitter: bool = True) -> T.Compose:
        """Per-image augmentation on a (C, H, W) uint8 tensor -> float in [0, 1], ``input_size`` square."""
        cfg = self.config
        size = self._input_size()
        ops: list[Any] = []
        if with_jitter and cfg.color_jitter and channels == 3:
            ops += [T.ColorJitter(0.4, 0.4, 0.4, 0.125), T.RandomGrayscale(cfg.grayscale_p)]
        if with_jitter and cfg.intensity_jitter > 0:
            ops.append(T.ColorJitter(brightness=cfg.intensity_jitter, contrast=cfg.intensity_jitter))
        if with_jitter and cfg.flip:
            ops.append(T.RandomHorizontalFlip())
        if with_jitter and cfg.rotate_degrees > 0:
            ops.append(T.RandomRotation(cfg.rotate_degrees))
        if cfg.resized_crop_scale is not None:
            ops.append(T.RandomResizedCrop(size, scale=tuple(cfg.resized_crop_scale), antialias=True))
        elif cfg.crop_sizes:
            side = min(self._shape[1:])  # type: ignore[index]
            crops = [T.RandomCrop(min(int(c), side)) for c in cfg.crop_sizes]
            ops.append(crops[0] if len(crops) == 1 else T.RandomChoice(crops))
        ops += [T.Resize((size, size), antialias=True), T.ToDtype(torch.float32, scale=True)]
        return T.Compose(ops)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def _eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """Un-augmented view of a uint8 batch, on the device: centre crop, resize."""
        x = self._to_float(x.to(self.device, non_blocking=True))
        if self.config.eval_crop is not None and self.config.eval_crop < min(x.shape[-2:]):
            x = TF.center_crop(x, [self.config.eval_crop, self.config.eval_crop])
        size = self._input_size()
        if tuple(x.shape[-2:]) != (size, size):
            x = TF.resize(x, [size, size], antialias=True)
        return self._layout(x)

    def _aug_view(self, x: torch.Tensor, transform: T.Compose) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        out = torch.stack([transform(xi) for xi in x])
        return self._layout(out.to(self.device, non_blocking=True))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _pixels(self, data: MultiViewData) -> torch.Tensor:
        if data.pixels is None:
            raise ValueError("MMDC needs data.pixels, (n, C, H, W) uint8")
        self.check_usable(data)
        px = torch.as_tensor(np.asarray(data.pixels))
        if px.ndim != 4:
            raise ValueError(f"data.pixels must be (n, C, H, W), got shape {tuple(px.shape)}")
        return px

    def _gather_pairs(self, dst: torch.Tensor, src: torch.Tensor, ops: GlobalOps) -> tuple[torch.Tensor, torch.Tensor]:
        if ops.world_size == 1:
            return dst, src
        allp = ops.all_gather_cat(torch.stack([dst, src], dim=1))
        return allp[:, 0], allp[:, 1]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _outputs(self, px: torch.Tensor) -> torch.Tensor:
        module = self._fitted("model_")
        was_training = module.training
        module.eval()
        outs = []
        for i in range(0, len(px), self.config.eval_batch_size):
            outs.append(module(self._eval_view(px[i:i + self.config.eval_batch_size])).float().cpu())
        module.train(was_training)
        if not outs:
            return torch.zeros(0, self.target_dim)
        return torch.cat(outs)

    def embed(self, data: MultiViewData) -> np.ndarray:
        """The network's L2-normalised outputs on the un-augmented view, (n, d)."""
        return self._outputs(self._pixels(data)).numpy()


    # ------------------------------------------------------------------ training
    def _fit(self, data: MultiViewData, ops: GlobalOps, resume: Resume | None) -> None:
        px = self._pixels(data)
        self._shape = tuple(int(s) for s in px.shape[1:])  # type: ignore[assignment]
        gidx = torch.from_numpy(np.asarray(data.extra.get("index", np.arange(len(px))), dtype=np.int64))
        if gidx.shape != (len(px),):
            raise ValueError("data.extra['index'] must hold one global index per item")
        n_global = self._check_global_index(gidx, ops)
        cfg = self.config
        if cfg.refine_init not in ("best", "restarts", "targets"):
            raise ValueError(f"unknown refine_init {cfg.refine_init!r}")
        # Same seed on every worker: same targets and same initial weights (DDP broadcasts rank 0's anyway).
        self.gmm_ = GaussianMixtureTargets(self.n_clusters, self.target_dim, cfg.sigma, cfg.means, seed=self.seed)
        self.model_ = self._build_model()
        if resume is None and self.warm_start is not None:  # before wrap: DDP starts from these weights
            self._load_warm_start(self.warm_start)
        self.targets_ = torch.from_numpy(self.gmm_.sample(n_global))
        net = self.wrap(self.model_)
        opt = _optimizer(self.model_, cfg)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
        start = 0
        if resume is not None:  # the checkpointed weights, target table, optimizer and schedule
            self.model_.load_state_dict(resume.state["model"])
            self.targets_ = torch.as_tensor(resume.state["targets"]).float().clone()
            opt.load_state_dict(resume.state["optimizer"])
            sched.load_state_dict(resume.state["scheduler"])
            start = int(resume.state["epoch"])
        steps = steps_per_epoch(len(px), cfg.batch_size, ops)
        check_min_batch(len(px), steps, 1, ops, "MMDC images")  # no empty batch: BatchNorm, Hungarian
        sampler = self.streams.sampler("batches", len(px), steps)
        views = (self._train_transform(self._shape[0]), self._train_transform(self._shape[0], with_jitter=False))
        for epoch in range(start, cfg.epochs):
            self._epoch(epoch, net, opt, px, gidx, sampler, views, ops)
            sched.step()
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
                self._checkpoint(Phase.EPOCH, ops, {
                    "model": self.model_.state_dict(), "targets": self.targets_, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1})
        broadcast_buffers(self.model_, ops)
        self.model_.eval()
        self.n_iter_ = cfg.epochs
        self.labels_ = self.predict(data)

    def warm_start_signature(self) -> dict[str, Any]:
        """What the network and its targets mean: the mixture, the architecture and the un-augmented view
        (not the training schedule or the augmentations)."""
        keys = ("sigma", "target_dim", "means", "backbone", "convnet_widths", "rotation", "input_size",
                "eval_crop")
        return {k: getattr(self.config, k) for k in keys}

    def _load_warm_start(self, state: dict[str, Any]) -> None:
        """The previous fit's network and mixture means (this fit's config and seed kept). The target table is
        then drawn for this archive's size, balanced as always (an unbalanced table would let a large cluster
        swallow the others); the first epoch's per-batch assignment then hands each item the target nearest
        the previous network's output, so training continues the previous clustering."""
        self._check_warm_start(state)
        shape = tuple(int(s) for s in state["shape"])
        if shape != self._shape:
            raise ValueError(f"warm start from a model of images {shape} (C, H, W); these are {self._shape}")
        self.model_.load_state_dict({k: torch.as_tensor(v) for k, v in state["model"].items()})
        # "random" means come from the seed: the previous ones, which the network was trained towards
        self.gmm_.means = np.asarray(state["means"], dtype=np.float32)
        self._report({"phase": "warm_start"})

    def _check_global_index(self, gidx: torch.Tensor, ops: GlobalOps) -> int:
        """The global item count; the indices must be 0..N-1 over all workers."""
        all_idx = ops.all_gather_cat(gidx) if ops.world_size > 1 else gidx
        n_global = int(all_idx.max().item()) + 1 if len(all_idx) else 0
        if len(all_idx) != n_global or torch.unique(all_idx).numel() != n_global:
            raise ValueError("global item indices must be a permutation of 0..N-1 across workers")
        if n_global < self.n_clusters:
            raise ValueError(f"MMDC needs at least n_clusters={self.n_clusters} items, got {n_global}")
        return n_global

    def _epoch(self, epoch: int, net: nn.Module, opt: torch.optim.Optimizer, px: torch.Tensor, gidx: torch.Tensor,
               sampler: EpochSampler, views: tuple[T.Compose, T.Compose], ops: GlobalOps) -> None:
        """[refinement] -> [rotation pass] -> clustering pass; each pass is one epoch of the sampler.
        ``views``: the augmentations of the clustering and of the rotation pass."""
        cfg = self.config
        t0 = time.perf_counter()
        start_labels = self.gmm_.labels(self.targets_)
        refining = cfg.refine_epoch is not None and epoch >= cfg.refine_epoch
        if refining:
            self._refine(px, gidx, ops, epoch)
        rot_loss = self._rotation_pass(net, opt, px, sampler, views[1]) if cfg.rotation else None
        total, count = 0.0, 0
        for _ in range(sampler.steps):
            b = torch.from_numpy(sampler.next())
            bidx = gidx[b]
            if not refining:
                # eval-mode forwards use the unwrapped module: no DDP collectives outside training steps
                self.model_.eval()
                with torch.no_grad():
                    pred = self.model_(self._eval_view(px[b])).float()
                src = torch.from_numpy(assign_targets(pred, self.targets_[bidx].to(pred.device)))
                dst_all, src_all = self._gather_pairs(bidx, bidx[src], ops)
                self.targets_[dst_all] = self.targets_[src_all]  # right side is a copy: a permutation
            net.train()
            out = net(self._aug_view(px[b], views[0]))
            loss = F.mse_loss(out, self.targets_[bidx].to(out.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        self._report({"phase": "epoch", "epoch": epoch, "loss": total / max(count, 1), "rotation_loss": rot_loss,
                      "changed": float((self.gmm_.labels(self.targets_) != start_labels).mean()),
                      "refining": refining, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})

    def _rotation_pass(self, net: nn.Module, opt: torch.optim.Optimizer, px: torch.Tensor,
                       sampler: EpochSampler, rot_tf: T.Compose) -> float:
        cfg = self.config
        total, count = 0.0, 0
        net.train()
        for _ in range(sampler.steps):
            b = torch.from_numpy(sampler.next())
            x = self._aug_view(px[b], rot_tf)
            xr, yr = rotation_batch(x) if cfg.rotation_copies == 4 else random_rotation_batch(x)
            loss = F.cross_entropy(net(self._layout(xr), head="rotation"), yr)
            opt.zero_grad(set_to_none=True)
            (cfg.rotation_weight * loss).backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        return total / max(count, 1)

    def _refine(self, px: torch.Tensor, gidx: torch.Tensor, ops: GlobalOps, epoch: int) -> None:
        """k-means on the outputs, clusters matched to the targets' components, targets := matched means
        (on rank 0, broadcast)."""
        z = self._outputs(px)
        idx = gidx
        if ops.world_size > 1:
            z, idx = ops.all_gather_cat(z), ops.all_gather_cat(gidx)
        table = self.targets_.clone()
        if ops.rank == 0:
            order = torch.argsort(idx)
            z, idx = z[order], idx[order]
            old = self.gmm_.labels(self.targets_[idx])
            init = self.config.refine_init
            candidates = []
            if init in ("best", "targets"):
                candidates.append(lloyd(z, torch.from_numpy(old), self.n_clusters, self.config.kmeans_niter, self.device))
            if init in ("best", "restarts"):
                _, lab, inertia = kmeans(z.numpy(), self.n_clusters, seed=self._kmeans_seed(epoch),
                                         niter=self.config.kmeans_niter, nredo=self.config.kmeans_nredo,
                                         use_gpu=self.device.type == "cuda")
                candidates.append((lab, inertia))
            new = min(candidates, key=lambda c: c[1])[0]
            mapping = match_mapping(new, old, self.n_clusters)  # mapping[new cluster] = old component
            table[idx] = torch.from_numpy(self.gmm_.means[mapping[new]])
        self.targets_ = ops.broadcast(table, src=0) if ops.world_size > 1 else table

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        model, gmm = self._fitted("model_"), self._fitted("gmm_")
        return {**self._header(), "shape": list(self._shape or ()), "model": self._net_state(model),
                "means": gmm.means.copy(), "sigma": gmm.sigma,
                "targets": self.targets_.clone() if getattr(self, "targets_", None) is not None else None,
                "history": list(self.history_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read_header(state)
        self._shape = tuple(int(s) for s in state["shape"])  # type: ignore[assignment]
        means = np.asarray(state["means"], dtype=np.float32)
        gmm = GaussianMixtureTargets.__new__(GaussianMixtureTargets)
        gmm.k, gmm.dim, gmm.sigma, gmm.means = means.shape[0], means.shape[1], float(state["sigma"]), means
        gmm._rng = None  # a loaded mixture predicts; it draws no new targets
        self.gmm_ = gmm
        self.targets_ = None if state.get("targets") is None else torch.as_tensor(state["targets"]).float()
        self.model_ = self._build_model()
        self.model_.load_state_dict({k: torch.as_tensor(v) for k, v in state["model"].items()})
        self.model_.eval()
        self.history_ = list(state.get("history", []))
        self.n_iter_ = self.config.epochs
