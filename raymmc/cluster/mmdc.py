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
inside one batch). Workers agree on the number of steps per pass (a worker with fewer items draws extra batches
from a fresh shuffle of its items). The network may be wrapped by the caller through ``wrap`` (e.g.
``lambda m: DistributedDataParallel(m, find_unused_parameters=True)``; the clustering and the rotation steps each
use one head only). Refinement gathers the outputs with ``all_gather_cat`` and rank 0's new table is broadcast.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn

from raymmc.cluster.backbones import build_backbone
from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.kmeans import kmeans, soft_from_distances

try:  # the project's wrappers around scipy (another module; fall back to scipy when absent)
    from raymmc.cluster.assignment import linear_assignment as _linear_assignment
    from raymmc.cluster.assignment import match_mapping as _match_mapping
except ImportError:  # pragma: no cover - depends on the tree's state
    from scipy.optimize import linear_sum_assignment as _lsa

    def _linear_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = _lsa(np.asarray(cost, dtype=np.float64))
        return rows.astype(np.int64), cols.astype(np.int64)

    def _match_mapping(new: np.ndarray, old: np.ndarray, k: int) -> np.ndarray:
        counts = np.zeros((k, k), dtype=np.float64)
        np.add.at(counts, (new, old), 1.0)
        rows, cols = _linear_assignment(counts.max() - counts)
        mapping = np.empty(k, dtype=np.int64)
        mapping[rows] = cols
        return mapping


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
    eval_batch_size: int = 512
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
        rng = np.random.default_rng(seed)
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
    rows, cols = _linear_assignment(cost)
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


class MMDC(Clusterer):
    """Multi-Modal Deep Clustering on ``data.pixels`` ((n, C, H, W) uint8).

    ``on_epoch(stats)`` is called after every epoch with ``epoch``, ``loss`` (mean clustering MSE), ``rotation_loss``
    (mean cross-entropy or None), ``changed`` (fraction of items whose target's component changed during the
    epoch, refinement included), ``refining``, ``lr`` and ``seconds``; the same dicts are kept in ``history_``.
    """

    def __init__(self, n_clusters: int, config: MMDCConfig | None = None, seed: int = 0,
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None):
        self.n_clusters = int(n_clusters)
        self.config = config or MMDCConfig()
        self.seed = int(seed)
        self.wrap = wrap
        self.on_epoch = on_epoch
        self.model: nn.Module | None = None
        self.gmm: GaussianMixtureTargets | None = None
        self.targets: torch.Tensor | None = None  # (N_global, d) float32, cpu
        self.history_: list[dict[str, Any]] = []
        self._shape: tuple[int, int, int] | None = None  # (C, H, W) of the training images
        self.device = self._resolve_device(self.config.device)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    @property
    def target_dim(self) -> int:
        return self.config.target_dim or self.n_clusters

    def _input_size(self) -> int:
        assert self._shape is not None
        return self.config.input_size or self._shape[1]

    def _build_model(self) -> nn.Module:
        assert self._shape is not None
        c, h, w = self._shape
        name = self.config.backbone
        if name == "auto":
            name = "convnet" if (c == 1 and min(h, w) <= 32) else "resnet18"
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
        px = torch.as_tensor(np.asarray(data.pixels))
        if px.ndim != 4:
            raise ValueError(f"data.pixels must be (n, C, H, W), got shape {tuple(px.shape)}")
        return px

    # ------------------------------------------------------------------ batching
    def _plan(self, n_local: int, rng: np.random.Generator, ops: GlobalOps) -> list[np.ndarray]:
        """One pass: a shuffle of the local items cut into ~batch_size batches of near-equal size; when other
        workers need more steps, extra full batches from fresh shuffles (each batch holds distinct items)."""
        bs = self.config.batch_size
        n_batches = max(1, -(-n_local // bs))
        batches = list(np.array_split(rng.permutation(n_local), n_batches))
        if ops.world_size > 1:
            counts = ops.all_gather_cat(torch.tensor([len(batches)], device=self.device))
            target = int(counts.max().item())
            while len(batches) < target:
                extra = rng.permutation(n_local)
                batches += [extra[i:i + bs] for i in range(0, n_local, bs)][: target - len(batches)]
        return batches

    def _gather_pairs(self, dst: torch.Tensor, src: torch.Tensor, ops: GlobalOps) -> tuple[torch.Tensor, torch.Tensor]:
        if ops.world_size == 1:
            return dst, src
        pairs = torch.stack([dst, src], dim=1).to(self.device)
        allp = ops.all_gather_cat(pairs).cpu()
        return allp[:, 0], allp[:, 1]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _outputs(self, px: torch.Tensor) -> torch.Tensor:
        module = self.model
        if module is None:
            raise RuntimeError("MMDC is not fitted")
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

    def _sq_dist(self, data: MultiViewData) -> np.ndarray:
        if self.gmm is None:
            raise RuntimeError("MMDC is not fitted")
        z = torch.from_numpy(self.embed(data))
        return (torch.cdist(z, torch.from_numpy(self.gmm.means)) ** 2).numpy()

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        """Student-t (a = 1) confidences from the squared distances to the mixture means; argmax = predict."""
        return soft_from_distances(self._sq_dist(data))

    def predict(self, data: MultiViewData) -> np.ndarray:
        """Nearest mixture mean to each output."""
        return self._sq_dist(data).argmin(axis=1)

    # ------------------------------------------------------------------ training
    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "MMDC":
        px = self._pixels(data)
        self._shape = tuple(int(s) for s in px.shape[1:])  # type: ignore[assignment]
        n_local = len(px)
        gidx = np.asarray(data.extra.get("index", np.arange(n_local)), dtype=np.int64)
        if gidx.shape != (n_local,):
            raise ValueError("data.extra['index'] must hold one global index per item")
        resume = self.resume_state or {}
        fork = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            self._fit(px, torch.from_numpy(gidx), ops, resume if resume.get("phase") == "epoch" else None)
        return self

    def _fit(self, px: torch.Tensor, gidx: torch.Tensor, ops: GlobalOps, resume: dict[str, Any] | None) -> None:
        cfg = self.config
        k = self.n_clusters
        # Global item count and a sanity check on the indices (they must be 0..N-1 over all workers).
        if ops.world_size > 1:
            all_idx = ops.all_gather_cat(gidx.to(self.device)).cpu()
        else:
            all_idx = gidx
        n_global = int(all_idx.max().item()) + 1 if len(all_idx) else 0
        if len(all_idx) != n_global or torch.unique(all_idx).numel() != n_global:
            raise ValueError("global item indices must be a permutation of 0..N-1 across workers")
        if n_global < k:
            raise ValueError(f"MMDC needs at least n_clusters={k} items, got {n_global}")

        # Same seed on every worker: same targets and same initial weights (DDP broadcasts rank 0's anyway).
        torch.manual_seed(self.seed)
        self.gmm = GaussianMixtureTargets(k, self.target_dim, cfg.sigma, cfg.means, seed=self.seed)
        table = torch.from_numpy(self.gmm.sample(n_global))
        if ops.world_size > 1:
            table = ops.broadcast(table.to(self.device), src=0).cpu()
        self.targets = table
        self.model = self._build_model()
        self.history_ = []
        if resume is not None:  # the checkpointed weights and target table; same on every worker
            self.model.load_state_dict(resume["model"]["model"])
            self.targets = torch.as_tensor(resume["model"]["targets"]).float().clone()
            self.history_ = list(resume["model"]["history"])
        net = self.wrap(self.model) if self.wrap is not None else self.model
        opt = _optimizer(self.model, cfg)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
        # Augmentations and shuffles differ between workers.
        torch.manual_seed(self.seed * 1_000_003 + 7919 * ops.rank + 1)
        rng = np.random.default_rng([self.seed, ops.rank])
        start = 0
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            start = int(resume["epoch"]) + 1
            if ops.world_size == 1 and "rng" in resume:
                # One process: its random streams continue exactly, so the resumed fit equals an uninterrupted one.
                torch.set_rng_state(resume["rng"]["torch"])
                rng.bit_generator.state = resume["rng"]["numpy"]
            else:  # only rank 0's streams were saved: every worker starts fresh, distinct streams
                torch.manual_seed(self.seed * 1_000_003 + 7919 * ops.rank + 104_729 * start + 1)
                rng = np.random.default_rng([self.seed, ops.rank, start])
            self.history_.append({"resumed_at_epoch": start})
        train_tf = self._train_transform(self._shape[0])  # type: ignore[index]
        rot_tf = self._train_transform(self._shape[0], with_jitter=False)  # type: ignore[index]

        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            start_labels = self.gmm.labels(self.targets)
            refining = cfg.refine_epoch is not None and epoch >= cfg.refine_epoch
            if refining:
                self._refine(px, gidx, ops, epoch)

            rot_loss = None
            if cfg.rotation:
                total, count = 0.0, 0
                net.train()
                for b in self._plan(len(px), rng, ops):
                    x = self._aug_view(px[b], rot_tf)
                    if cfg.rotation_copies == 4:
                        xr, yr = rotation_batch(x)
                    else:
                        xr, yr = random_rotation_batch(x)
                    loss = F.cross_entropy(net(self._layout(xr), head="rotation"), yr)
                    opt.zero_grad(set_to_none=True)
                    (cfg.rotation_weight * loss).backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                    count += len(b)
                rot_loss = total / max(count, 1)

            total, count = 0.0, 0
            for b in self._plan(len(px), rng, ops):
                bidx = gidx[b]
                if not refining:
                    # eval-mode forwards use the unwrapped module: no DDP collectives outside training steps
                    self.model.eval()
                    with torch.no_grad():
                        pred = self.model(self._eval_view(px[b])).float()
                    src = torch.from_numpy(assign_targets(pred, self.targets[bidx].to(pred.device)))
                    dst_all, src_all = self._gather_pairs(bidx, bidx[src], ops)
                    self.targets[dst_all] = self.targets[src_all]  # right side is a copy: a permutation
                net.train()
                out = net(self._aug_view(px[b], train_tf))
                loss = F.mse_loss(out, self.targets[bidx].to(out.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
                count += len(b)
            lr = opt.param_groups[0]["lr"]
            sched.step()

            stats = {"epoch": epoch, "loss": total / max(count, 1), "rotation_loss": rot_loss,
                     "changed": float((self.gmm.labels(self.targets) != start_labels).mean()),
                     "refining": refining, "lr": lr, "seconds": time.perf_counter() - t0}
            self.history_.append(stats)
            if self.on_epoch is not None:
                self.on_epoch(stats)
            if self.checkpoint_fn is not None and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
                # Deep copies: state dicts alias the live weights and momentum buffers.
                self.checkpoint_fn(copy.deepcopy({
                    "phase": "epoch", "epoch": epoch, "model": self.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}}))
        self.model.eval()

    def _refine(self, px: torch.Tensor, gidx: torch.Tensor, ops: GlobalOps, epoch: int) -> None:
        """k-means on the outputs, clusters matched to the targets' components, targets := matched means."""
        assert self.gmm is not None and self.targets is not None
        z = self._outputs(px)
        idx = gidx
        if ops.world_size > 1:
            z = ops.all_gather_cat(z.to(self.device)).cpu()
            idx = ops.all_gather_cat(gidx.to(self.device)).cpu()
        order = torch.argsort(idx)  # same item order on every worker
        z, idx = z[order], idx[order]
        old = self.gmm.labels(self.targets[idx])
        init = self.config.refine_init
        if init not in ("best", "restarts", "targets"):
            raise ValueError(f"unknown refine_init {init!r}")
        candidates = []
        if init in ("best", "targets"):
            candidates.append(lloyd(z, torch.from_numpy(old), self.n_clusters, self.config.kmeans_niter, self.device))
        if init in ("best", "restarts"):
            _, lab, inertia = kmeans(z.numpy(), self.n_clusters, seed=self.seed + epoch,
                                     niter=self.config.kmeans_niter, nredo=self.config.kmeans_nredo,
                                     use_gpu=self.device.type == "cuda")
            candidates.append((lab, inertia))
        new = min(candidates, key=lambda c: c[1])[0]
        mapping = _match_mapping(new, old, self.n_clusters)  # mapping[new cluster] = old component
        table = self.targets.clone()
        table[idx] = torch.from_numpy(self.gmm.means[mapping[new]])
        if ops.world_size > 1:
            table = ops.broadcast(table.to(self.device), src=0).cpu()
        self.targets = table

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        if self.model is None or self.gmm is None:
            raise RuntimeError("MMDC is not fitted")
        cfg = asdict(self.config)
        return {"n_clusters": self.n_clusters, "seed": self.seed, "config": cfg, "shape": list(self._shape or ()),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "means": self.gmm.means.copy(), "sigma": self.gmm.sigma,
                "targets": self.targets.clone() if self.targets is not None else None,
                "history": list(self.history_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = dict(state["config"])
        for key in ("lr_milestones", "crop_sizes", "resized_crop_scale", "convnet_widths"):
            if cfg.get(key) is not None:
                cfg[key] = tuple(cfg[key])
        self.config = MMDCConfig(**cfg)
        self.n_clusters = int(state["n_clusters"])
        self.seed = int(state["seed"])
        self.device = self._resolve_device(self.config.device)
        self._shape = tuple(int(s) for s in state["shape"])  # type: ignore[assignment]
        means = np.asarray(state["means"], dtype=np.float32)
        gmm = GaussianMixtureTargets.__new__(GaussianMixtureTargets)
        gmm.k, gmm.dim, gmm.sigma, gmm.means = means.shape[0], means.shape[1], float(state["sigma"]), means
        gmm._rng = np.random.default_rng(self.seed)
        self.gmm = gmm
        self.targets = None if state.get("targets") is None else torch.as_tensor(state["targets"]).float()
        self.model = self._build_model()
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state["model"].items()})
        self.model.eval()
        self.history_ = list(state.get("history", []))
