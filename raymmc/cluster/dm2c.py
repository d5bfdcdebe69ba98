"""DM2C: deep mixed-modal clustering (Jiang et al., NeurIPS 2019).

Every item has an image OR a text (mixed-modal), never a known pair. DM2C learns

* one autoencoder per modality on the extracted features (``Linear -> BatchNorm -> LeakyReLU(0.2)``
  hidden layers, linear latent and linear output), giving latent spaces Z_i and Z_t of equal size;
* two cross-modal mappings between the latent spaces, ``G_it: Z_i -> Z_t`` and ``G_ti: Z_t -> Z_i``
  (MLPs 128-256-128), tied by cycle consistency and trained adversarially against
* two WGAN critics ``D_i`` (on Z_i) and ``D_t`` (on Z_t) (MLPs 128-32-1, weight clipping +-c, RMSprop);

then maps every item into one modality's latent space (``G_ti`` for texts when the target is the
image space) and runs seeded k-means on all points there.

Losses (per modality, means over the batch; norms over feature dimensions as in the paper's Eq. 1-3):

* reconstruction ``L_rec = E |x - Dec(Enc(x))|_2^2`` (image and text),
* cycle ``L_cyc = E |z_i - G_ti(G_it(z_i))|_1 + E |z_t - G_it(G_ti(z_t))|_1``,
* adversarial (generator side) ``L_adv = -E D_i(G_ti(z_t)) - E D_t(G_it(z_i))``,
* generator step minimises ``lambda_recon * L_rec + lambda_cycle * L_cyc + lambda_adv * L_adv`` over the
  autoencoders (lr ``lr_ae``) and mappings (lr ``lr_g``) -- the paper's Eq. 4/5;
* critic step maximises ``E D_i(z_i) - E D_i(G_ti(z_t))`` and ``E D_t(z_t) - E D_t(G_it(z_i))``
  (lr ``lr_d``), then clips every critic weight to ``[-clip, clip]``.

Alignment (``alignment``): ``"wgan"`` (the paper) as above; ``"sinkhorn"`` (ours, critic-free) replaces the
critics by the debiased Sinkhorn divergence between each batch of mapped latents and a batch of real latents
of the target modality (``sinkhorn_divergence``; entropic OT with blur ``sinkhorn_blur`` relative to the
batch's mean squared distance): a distance a mapping can follow from the first step, with no critic to
balance, no clipping and no ``n_critic``. ``lambda_adv`` weighs it as it weighs the adversarial term.

Schedules (``critic_schedule``): ``"paper"`` = Algorithm 1 / WGAN: ``n_critic`` critic steps (fresh
batches each) before every generator step; ``"public_code"`` = the authors' released code: one critic
step after every ``public_code_gen_per_critic`` (5) generator steps, on that generator step's batch.

Distributed use (Ray Train): the six networks are passed through the ``wrap`` hook (e.g. DDP); each
worker draws batches of each modality from its local shard with the lock-step sampler
(``raymmc.cluster.sampler``: an epoch is the same number of steps on every worker, counted from the
largest local pool); the k-means sample and the ``"auto"`` target choice are gathered, computed on
rank 0 and broadcast. Phases and checkpoints: pretraining (``pretrained``), adversarial epochs
(``adversarial`` every ``checkpoint_every`` epochs), then unification and k-means.

Our choices (the paper leaves them open) are config options: input rows L2-normalised
(``input_norm``), AE pretraining with Adam, joint AE + mapping generator step (``joint_ae``),
paired items contribute to both modality pools and embed through their own target-modality latent,
``target_modality="auto"`` picks the modality whose own latents have the higher k-means silhouette
(no labels), and ``embed_norm="l2"`` normalises the unified embeddings before k-means.

Measured (``benchmarks/dm2c.py``, tuxpaint 516 items / 11 classes, mixed-modal splits seeds 0-4, defaults):
ACC 0.310 ± 0.014, NMI 0.279 ± 0.026 -- below k-means on the concatenated zero-filled features
(0.374 ± 0.011 / 0.352 ± 0.011), level with the paper's stacked-PCA k-means protocol (0.306 ± 0.021 /
0.247 ± 0.018). The learnt mappings do not carry classes across modalities on these features (a mapped
text's nearest image shares its class 0.14 of the time, chance 0.15); on a toy whose two modalities
share their geometry they do (tests/test_dm2c.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from raymmc.cluster.base import GlobalOps, MultiViewData
from raymmc.cluster.checkpoint import Phase, Resume
from raymmc.cluster.deep import DeepClusterer
from raymmc.cluster.kmeans import InitConfig, NearestCentroid, init_centroids, kmeans, squared_distances
from raymmc.cluster.lloyd import NearestSearch, item_keys, lloyd
from raymmc.cluster.nets import broadcast_buffers, forward_in_batches, unwrap
from raymmc.cluster.pretrain import pretrain_autoencoder
from raymmc.cluster.sampler import EpochSampler, check_min_batch, steps_per_epoch
from raymmc.cluster.views import l2_normalize

MODALITIES = ("image", "text")
NETS = ("ae_i", "ae_t", "g_it", "g_ti", "d_i", "d_t")


@dataclass
class DM2CConfig:
    # --- architecture (paper, Wikipedia: 1024-256-128 AEs, 128-256-128 mappings, 128-32-1 critics) ---
    # Our features are image 1280-d (MobileNetV2) and text 384-d (MiniLM), ~500 items: one hidden
    # layer of 256 then the 128-d latent keeps the paper's latent/mapping/critic sizes.
    image_hidden: tuple[int, ...] = (256,)
    text_hidden: tuple[int, ...] = (256,)
    latent_dim: int = 128
    mapping_hidden: tuple[int, ...] = (256,)
    critic_hidden: tuple[int, ...] = (32,)
    # --- optimisation (paper: AE 1e-3, G 1e-4, D 5e-5; lambda_1 (cycle) 1, lambda_2 (recon) 2) ---
    lr_ae: float = 1e-3
    lr_g: float = 1e-4
    lr_d: float = 5e-5
    lambda_cycle: float = 1.0
    lambda_recon: float = 2.0
    lambda_adv: float = 1.0
    clip: float = 0.05
    # "wgan": the paper's critics; "sinkhorn": critic-free, the debiased Sinkhorn divergence between mapped and
    # real latents (see the module docstring); the critics are then kept (same state shapes) but never trained
    alignment: Literal["wgan", "sinkhorn"] = "wgan"
    sinkhorn_blur: float = 0.05  # entropic regularisation, as a fraction of the batch's mean squared distance
    sinkhorn_iters: int = 50  # Sinkhorn iterations per divergence (log domain)
    critic_schedule: Literal["paper", "public_code"] = "paper"
    n_critic: int = 5  # "paper": critic steps per generator step
    public_code_gen_per_critic: int = 5  # "public_code": generator steps per critic step
    batch_size: int = 64  # public code 128; ~260 items per modality here -> 5 generator steps per epoch
    pretrain_epochs: int = 100  # AE pretraining (Adam, lr_ae), each modality on its own items
    adv_epochs: int = 100  # adversarial phase; an epoch = one pass over the larger modality pool
    weight_decay: float = 0.0
    # True: cycle/adversarial gradients reach the encoders (Eq. 5 minimises L over AEs and G jointly).
    # False: latents are detached before the mappings; the AEs learn from reconstruction only.
    joint_ae: bool = True
    # "sum": the paper's norms (Eq. 1-2: summed over feature dims, mean over items); "mean": the public
    # code's element means (F.mse_loss / F.l1_loss), which shrinks recon/cycle next to the adversarial term.
    loss_reduction: Literal["sum", "mean"] = "sum"
    # --- data and clustering ---
    input_norm: Literal["l2", "none"] = "l2"
    # The paper maps texts into the image space ("image"); "auto" picks the space whose own latents
    # have the higher k-means silhouette (label-free). On tuxpaint "auto" also picks "image".
    target_modality: Literal["image", "text", "auto"] = "image"
    # "l2": unified embeddings are L2-normalised before k-means (as the k-means baseline's features;
    # +0.03 ACC on tuning splits); "none": raw latents (the paper's wording: latents "fed into" k-means).
    embed_norm: Literal["l2", "none"] = "l2"
    kmeans_niter: int = 100
    kmeans_nredo: int = 10
    kmeans_sample: int = 200_000  # at most this many unified embeddings gathered (over all workers) for k-means
    auto_sample: int = 2000  # max items per modality for the "auto" silhouette
    checkpoint_every: int = 10  # adversarial epochs between resumable checkpoints, where a trainer asks for them
    device: str = "auto"  # "auto": cuda when available
    eval_batch_size: int = 4096  # rows per forward pass outside training: bounds memory, not results

    def __post_init__(self) -> None:
        if self.critic_schedule not in ("paper", "public_code"):
            raise ValueError(f"critic_schedule must be 'paper' or 'public_code', got {self.critic_schedule!r}")
        if self.alignment not in ("wgan", "sinkhorn"):
            raise ValueError(f"alignment must be 'wgan' or 'sinkhorn', got {self.alignment!r}")
        if self.sinkhorn_blur <= 0 or self.sinkhorn_iters < 1:
            raise ValueError("sinkhorn_blur must be > 0 and sinkhorn_iters >= 1")
        if self.target_modality not in ("image", "text", "auto"):
            raise ValueError(f"target_modality must be image|text|auto, got {self.target_modality!r}")
        if self.embed_norm not in ("l2", "none"):
            raise ValueError(f"embed_norm must be 'l2' or 'none', got {self.embed_norm!r}")
        for name in ("image_hidden", "text_hidden", "mapping_hidden", "critic_hidden"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))


# ----------------------------------------------------------------------------------------- networks

def _fc_bn_lrelu(dims: Sequence[int], batch_norm: bool = True) -> nn.Sequential:
    """``dims[0] -> ... -> dims[-1]``: every hidden layer Linear -> (BatchNorm) -> LeakyReLU(0.2);
    the last layer is linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class ModalityAE(nn.Module):
    """``forward(x) -> (z, x_rec)``; encoder ``d -> hidden -> latent``, decoder mirrored."""

    def __init__(self, in_dim: int, hidden: Sequence[int], latent: int):
        super().__init__()
        dims = [in_dim, *hidden, latent]
        self.encoder = _fc_bn_lrelu(dims)
        self.decoder = _fc_bn_lrelu(dims[::-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def mapping_net(latent: int, hidden: Sequence[int]) -> nn.Sequential:
    return _fc_bn_lrelu([latent, *hidden, latent])


def critic_net(latent: int, hidden: Sequence[int]) -> nn.Sequential:
    """WGAN critic: no BatchNorm (it would couple the samples of a batch)."""
    return _fc_bn_lrelu([latent, *hidden, 1], batch_norm=False)


# ------------------------------------------------------------------------------------------- losses

def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Paper Eq. 1: squared L2 norm per item, mean over items (``reduction="sum"`` over dimensions);
    ``"mean"`` also averages over dimensions (``F.mse_loss``, as the public code)."""
    e = (x - x_rec).pow(2)
    return e.sum(dim=1).mean() if reduction == "sum" else e.mean()


def cycle_loss(z: torch.Tensor, z_cyc: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Paper Eq. 2: L1 norm per item, mean over items (``"mean"``: ``F.l1_loss``, as the public code)."""
    e = (z - z_cyc).abs()
    return e.sum(dim=1).mean() if reduction == "sum" else e.mean()


def _entropic_ot(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Entropic OT between two uniform point clouds whose pairwise ``cost`` matrix is given, as the dual value
    ``mean(f) + mean(g)``. The potentials are iterated without a graph (log-domain Sinkhorn); one last
    differentiable update of each from the other's fixed value gives the gradient with respect to the cost
    (exact at convergence, by the envelope theorem), at the memory of a single step."""
    n, m = cost.shape
    log_a = torch.full((n,), -float(np.log(n)), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -float(np.log(m)), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    with torch.no_grad():
        c = cost.detach()
        for _ in range(iters):
            f = -eps * torch.logsumexp((g[None, :] - c) / eps + log_b[None, :], dim=1)
            g = -eps * torch.logsumexp((f[:, None] - c) / eps + log_a[:, None], dim=0)
    f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
    g = -eps * torch.logsumexp((f.detach()[:, None] - cost) / eps + log_a[:, None], dim=0)
    return f.mean() + g.mean()


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Debiased Sinkhorn divergence ``OT(x, y) - (OT(x, x) + OT(y, y)) / 2`` (Feydy et al. 2019): zero when the
    two clouds are the same, positive and growing with their distance otherwise. The regularisation is
    ``blur`` times the mean squared distance between ``x`` and ``y`` (fixed for the three terms, so that the
    scale of the latents does not change how sharp the transport is)."""
    def cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a, b).pow(2)

    cxy = cost(x, y)
    eps = float(blur * cxy.detach().mean().clamp_min(1e-12))
    self_terms = _entropic_ot(cost(x, x), eps, iters) + _entropic_ot(cost(y, y), eps, iters)
    return _entropic_ot(cxy, eps, iters) - 0.5 * self_terms


def generator_losses(ae_i: nn.Module, ae_t: nn.Module, g_it: nn.Module, g_ti: nn.Module, d_i: nn.Module,
                     d_t: nn.Module, x_i: torch.Tensor, x_t: torch.Tensor, cfg: DM2CConfig
                     ) -> dict[str, torch.Tensor]:
    """All generator-side terms for one image batch ``x_i`` and one text batch ``x_t``.

    Returns a dict with ``total`` (the thing to minimise), its parts, and the (detached) latents and
    mapped latents for a critic step that reuses the batch (public-code schedule).
    """
    z_i, x_i_rec = ae_i(x_i)
    z_t, x_t_rec = ae_t(x_t)
    red = cfg.loss_reduction
    rec = reconstruction_loss(x_i, x_i_rec, red) + reconstruction_loss(x_t, x_t_rec, red)
    zi_in, zt_in = (z_i, z_t) if cfg.joint_ae else (z_i.detach(), z_t.detach())
    fake_t = g_it(zi_in)  # image latents mapped into the text space
    fake_i = g_ti(zt_in)  # text latents mapped into the image space
    cyc = cycle_loss(zi_in, g_ti(fake_t), red) + cycle_loss(zt_in, g_it(fake_i), red)
    if cfg.alignment == "sinkhorn":  # the mapped latents move towards the real ones, not the reverse
        sk = partial(sinkhorn_divergence, blur=cfg.sinkhorn_blur, iters=cfg.sinkhorn_iters)
        adv = sk(fake_i, z_i.detach()) + sk(fake_t, z_t.detach())
    else:
        adv = -d_i(fake_i).mean() - d_t(fake_t).mean()
    total = cfg.lambda_recon * rec + cfg.lambda_cycle * cyc + cfg.lambda_adv * adv
    return {"total": total, "recon": rec, "cycle": cyc, "adv": adv,
            "z_i": z_i.detach(), "z_t": z_t.detach(), "fake_i": fake_i.detach(), "fake_t": fake_t.detach()}


def critic_objective(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's estimate of the Wasserstein distance, ``E D(real) - E D(fake)`` (maximised)."""
    return d(real).mean() - d(fake).mean()


def clip_weights(module: nn.Module, c: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(-c, c)


# --------------------------------------------------------------------------------------- the model

class DM2C(NearestCentroid, DeepClusterer):
    """Deep mixed-modal clustering. ``fit`` -> ``predict`` / ``soft_assign`` / ``embed``.

    Fitted: ``nets_`` (the six networks, unwrapped), ``target_`` (the modality whose latent space
    holds the clusters), ``cluster_centers_`` (k-means centroids there), ``silhouette_`` (the "auto"
    scores), ``counters_`` (pretraining / generator / critic steps), ``n_iter_`` (generator steps).
    Every item needs an image or a text (``usable``)."""

    supports_warm_start = True  # the six networks, the target space and (Lloyd from) the centroids
    name = "dm2c"
    Config = DM2CConfig

    def usable(self, data: MultiViewData) -> np.ndarray:
        return np.asarray(data.has_image, bool) | np.asarray(data.has_text, bool)

    # ---------------------------------------------------------------------------------- building
    def _new_nets(self, d_image: int, d_text: int) -> dict[str, nn.Module]:
        cfg = self.config
        with self._seeded_weights():
            nets = {
                "ae_i": ModalityAE(d_image, cfg.image_hidden, cfg.latent_dim),
                "ae_t": ModalityAE(d_text, cfg.text_hidden, cfg.latent_dim),
                "g_it": mapping_net(cfg.latent_dim, cfg.mapping_hidden),
                "g_ti": mapping_net(cfg.latent_dim, cfg.mapping_hidden),
                "d_i": critic_net(cfg.latent_dim, cfg.critic_hidden),
                "d_t": critic_net(cfg.latent_dim, cfg.critic_hidden),
            }
        for n in ("d_i", "d_t"):
            clip_weights(nets[n], cfg.clip)  # a critic starts inside its clipping box
        return {k: v.to(self.device) for k, v in nets.items()}

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return l2_normalize(x) if self.config.input_norm == "l2" else x

    def _modal_rows(self, data: MultiViewData) -> dict[str, torch.Tensor]:
        if data.image is None or data.text is None:
            raise ValueError("DM2C needs both an image and a text feature matrix (rows of missing views are ignored)")
        self.check_usable(data)
        return {m: torch.from_numpy(self._prep(x[has])).to(self.device)
                for m, x, has in (("image", data.image, data.has_image), ("text", data.text, data.has_text))}

    def _samplers(self, rows: dict[str, torch.Tensor], ops: GlobalOps) -> dict[str, EpochSampler]:
        """One lock-step sampler per modality; BatchNorm needs at least 2 rows per batch."""
        bs = max(2, self.config.batch_size)
        steps = {m: steps_per_epoch(len(rows[m]), bs, ops) for m in MODALITIES}  # bs: the global batch
        for m in MODALITIES:  # every worker refuses together: none is left waiting in a collective
            check_min_batch(len(rows[m]), steps[m], 2, ops, f"DM2C {m} items")
        return {m: self.streams.sampler(m, len(rows[m]), steps[m], min_batch=2) for m in MODALITIES}

    # ----------------------------------------------------------------------------------- fitting
    def _fit(self, data: MultiViewData, ops: GlobalOps, resume: Resume | None) -> None:
        cfg = self.config
        rows = self._modal_rows(data)
        self.dims_ = {"image": int(data.image.shape[1]), "text": int(data.text.shape[1])}
        raw = self._new_nets(self.dims_["image"], self.dims_["text"])
        samplers = self._samplers(rows, ops)
        start, opt_states = 0, None
        self.counters_ = {"pretrain_steps": 0, "gen_steps": 0, "critic_steps": 0}
        # a warm start also governs a resumed warm-started fit (a restarted worker group): its target space and
        # centroids come from the previous model; only the networks come from the checkpoint
        warm = self.warm_start
        if warm is not None:
            self._check_warm_start(warm)
            if {k: int(v) for k, v in warm["dims"].items()} != self.dims_:
                raise ValueError(f"warm start from a model of input widths {warm['dims']}, these have {self.dims_}")
        if resume is not None:  # all six networks: the mappings and critics keep their initial weights too
            for k, v in raw.items():
                v.load_state_dict(resume.state["nets"][k])
            self.counters_ = {k: int(v) for k, v in resume.state["counters"].items()}
            start, opt_states = int(resume.state.get("epoch", 0)), resume.state.get("optimizers")
        elif warm is not None:  # the previous fit's six networks: no pretraining, adversarial training goes on
            for k, v in raw.items():
                v.load_state_dict(warm["nets"][k])
            self._report({"phase": "warm_start"})
        self.nets_ = raw
        net = {k: self.wrap(v) for k, v in raw.items()}
        if resume is None and warm is None:
            for m, key in (("image", "ae_i"), ("text", "ae_t")):
                pretrain_autoencoder(net[key], rows[m], epochs=cfg.pretrain_epochs, lr=cfg.lr_ae,
                                     weight_decay=cfg.weight_decay, sampler=samplers[m], ops=ops, device=self.device,
                                     loss=partial(reconstruction_loss, reduction=cfg.loss_reduction),
                                     report=self._report, view=m)
                self.counters_["pretrain_steps"] += cfg.pretrain_epochs * samplers[m].steps
            self._checkpoint(Phase.PRETRAINED, ops, self._training_state(0, None))
        self._train_adversarial(net, rows, samplers, ops, start, opt_states)
        for v in raw.values():
            broadcast_buffers(v, ops)
            v.eval()
        # a warm start keeps the previous target space, so that its centroids still mean something there
        if warm is not None:
            self.target_, self.silhouette_ = warm["target"], dict(warm.get("silhouette", {}))
        else:
            self.target_ = self._choose_target(rows, ops)
        z = self._embed_tensor(data).cpu()
        if warm is not None:  # Lloyd from the previous centroids (every worker's own rows)
            self.cluster_centers_ = lloyd(z.numpy(), np.asarray(warm["centroids"], np.float32), ops,
                                          max_iter=cfg.kmeans_niter, tol=0.0,
                                          search=NearestSearch(z.shape[1])).centers
        else:
            init = InitConfig(nredo=cfg.kmeans_nredo, niter=cfg.kmeans_niter, sample=cfg.kmeans_sample)
            # the k-means sample keyed by item: the same rows for any worker count
            priority = self.streams.row_keys(item_keys(data.ids, data.extra.get("index"), len(data)))
            self.cluster_centers_ = init_centroids(z, self.n_clusters, init, ops, seed=self._kmeans_seed(),
                                                   priority=priority).numpy()
        self.n_iter_ = self.counters_["gen_steps"]
        self.labels_ = squared_distances(z.numpy(), self.cluster_centers_).argmin(1)

    def warm_start_signature(self) -> dict[str, Any]:
        """The six networks' shapes and the input preparation (not the schedules or learning rates)."""
        keys = ("image_hidden", "text_hidden", "latent_dim", "mapping_hidden", "critic_hidden", "input_norm",
                "embed_norm")
        return {k: getattr(self.config, k) for k in keys}

    def _training_state(self, epoch: int, opts: dict[str, torch.optim.Optimizer] | None) -> dict[str, Any]:
        state = {"nets": {k: v.state_dict() for k, v in self.nets_.items()}, "counters": dict(self.counters_),
                 "epoch": epoch}
        if opts is not None:
            state["optimizers"] = {k: o.state_dict() for k, o in opts.items()}
        return state

    def _train_adversarial(self, net: dict[str, nn.Module], rows: dict[str, torch.Tensor],
                           samplers: dict[str, EpochSampler], ops: GlobalOps, start: int,
                           opt_states: dict[str, Any] | None) -> None:
        """``adv_epochs`` epochs of generator steps (as many per epoch as the larger modality's sampler),
        with the critic schedule of the config; a checkpoint every ``checkpoint_every`` epochs."""
        cfg = self.config
        steps = max(s.steps for s in samplers.values())
        ae_params = list(net["ae_i"].parameters()) + list(net["ae_t"].parameters())
        g_params = list(net["g_it"].parameters()) + list(net["g_ti"].parameters())
        opts = {"g": torch.optim.RMSprop([{"params": ae_params, "lr": cfg.lr_ae}, {"params": g_params, "lr": cfg.lr_g}],
                                         lr=cfg.lr_g, weight_decay=cfg.weight_decay),
                "d": torch.optim.RMSprop(list(net["d_i"].parameters()) + list(net["d_t"].parameters()),
                                         lr=cfg.lr_d, weight_decay=cfg.weight_decay)}
        if opt_states is not None:
            for k, o in opts.items():
                o.load_state_dict(opt_states[k])
        batch = {m: (lambda m=m: rows[m][torch.from_numpy(samplers[m].next()).to(rows[m].device)]) for m in MODALITIES}
        for v in net.values():
            v.train()
        critics = cfg.alignment == "wgan"  # "sinkhorn" trains no critic
        for ep in range(start, cfg.adv_epochs):
            sums = dict.fromkeys(("total", "recon", "cycle", "adv", "w_i", "w_t"), 0.0)
            n_crit = 0
            for _ in range(steps):
                for _ in range(cfg.n_critic if critics and cfg.critic_schedule == "paper" else 0):
                    with torch.no_grad():
                        z_i, _ = net["ae_i"](batch["image"]())
                        z_t, _ = net["ae_t"](batch["text"]())
                        fakes = net["g_ti"](z_t), net["g_it"](z_i)
                    n_crit += self._critic_step(net, opts["d"], z_i, z_t, *fakes, sums)
                out = generator_losses(net["ae_i"], net["ae_t"], net["g_it"], net["g_ti"], net["d_i"], net["d_t"],
                                       batch["image"](), batch["text"](), cfg)
                opts["g"].zero_grad(set_to_none=True)
                out["total"].backward()
                opts["g"].step()
                self.counters_["gen_steps"] += 1
                for k in ("total", "recon", "cycle", "adv"):
                    sums[k] += float(out[k].detach())
                if critics and cfg.critic_schedule == "public_code" and \
                        self.counters_["gen_steps"] % cfg.public_code_gen_per_critic == 0:
                    n_crit += self._critic_step(net, opts["d"], out["z_i"], out["z_t"], out["fake_i"], out["fake_t"], sums)
            rec = {"phase": "adversarial", "epoch": ep, **{k: sums[k] / steps for k in ("total", "recon", "cycle", "adv")},
                   **{k: (sums[k] / n_crit if n_crit else float("nan")) for k in ("w_i", "w_t")}, "critic_steps": n_crit}
            self._report(rec)
            if cfg.checkpoint_every and (ep + 1) % cfg.checkpoint_every == 0 and ep + 1 < cfg.adv_epochs:
                self._checkpoint(Phase.ADVERSARIAL, ops, self._training_state(ep + 1, opts))

    def _critic_step(self, net, opt_d, z_i, z_t, fake_i, fake_t, sums: dict[str, float]) -> int:
        """One critic update (maximise both Wasserstein estimates, then clip); adds to ``sums``."""
        w_i = critic_objective(net["d_i"], z_i, fake_i)
        w_t = critic_objective(net["d_t"], z_t, fake_t)
        opt_d.zero_grad(set_to_none=True)
        (-(w_i + w_t)).backward()
        opt_d.step()
        clip_weights(net["d_i"], self.config.clip)
        clip_weights(net["d_t"], self.config.clip)
        self.counters_["critic_steps"] += 1
        sums["w_i"] += float(w_i.detach())
        sums["w_t"] += float(w_t.detach())
        return 1

    # ------------------------------------------------------------------------- unify and cluster
    def _latents(self, rows: torch.Tensor, modality: str) -> torch.Tensor:
        ae = self.nets_["ae_i" if modality == "image" else "ae_t"]
        return forward_in_batches(ae.encoder, rows, device=self.device, batch_size=self.config.eval_batch_size)[0]

    def _choose_target(self, rows: dict[str, torch.Tensor], ops: GlobalOps) -> str:
        """The configured target modality, or ("auto") the one whose own latents have the higher k-means
        silhouette on a gathered sample (computed on rank 0, broadcast)."""
        if self.config.target_modality != "auto":
            self.silhouette_ = {}
            return self.config.target_modality
        from sklearn.metrics import silhouette_score

        cfg = self.config
        scores = torch.full((2,), -1.0, dtype=torch.float64)
        for i, m in enumerate(MODALITIES):
            z = self._latents(rows[m], m)
            if cfg.embed_norm == "l2":  # judge each space in the geometry k-means will see
                z = torch.nn.functional.normalize(z, dim=1)
            take = max(1, cfg.auto_sample // max(1, ops.world_size))
            if len(z) > take:
                z = z[torch.from_numpy(np.sort(self.streams.generator("auto_sample").choice(len(z), take, replace=False)))]
            zall = ops.all_gather_cat(z.contiguous()).numpy().astype(np.float32)
            k = min(self.n_clusters, len(zall) - 1)
            if ops.rank == 0 and k >= 2:
                _, lab, _ = kmeans(zall, k, seed=self._kmeans_seed(1 + i), niter=cfg.kmeans_niter, nredo=cfg.kmeans_nredo)
                scores[i] = float(silhouette_score(zall, lab)) if len(np.unique(lab)) > 1 else -1.0
        scores = ops.broadcast(scores, src=0) if ops.world_size > 1 else scores
        self.silhouette_ = {m: float(scores[i]) for i, m in enumerate(MODALITIES)}
        return "image" if scores[0] >= scores[1] else "text"

    def _embed_tensor(self, data: MultiViewData) -> torch.Tensor:
        self._fitted("nets_")
        self._fitted("target_")
        self.check_usable(data)
        tgt = self.target_
        other = "text" if tgt == "image" else "image"
        has = {"image": np.asarray(data.has_image, bool), "text": np.asarray(data.has_text, bool)}
        feats = {"image": data.image, "text": data.text}
        out = torch.zeros((len(data), self.config.latent_dim))
        own = has[tgt]
        if own.any():
            out[torch.from_numpy(np.flatnonzero(own))] = self._latents(torch.from_numpy(self._prep(feats[tgt][own])), tgt)
        mapped = ~own  # these have only the other modality
        if mapped.any():
            g = self.nets_["g_ti" if tgt == "image" else "g_it"]
            z = self._latents(torch.from_numpy(self._prep(feats[other][mapped])), other)
            out[torch.from_numpy(np.flatnonzero(mapped))] = forward_in_batches(
                g, z, device=self.device, batch_size=self.config.eval_batch_size)[0]
        if self.config.embed_norm == "l2":
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    # ------------------------------------------------------------------------------- interface
    def embed(self, data: MultiViewData) -> np.ndarray:
        """Every item in the target modality's latent space (the other modality through G)."""
        return self._embed_tensor(data).numpy()

    def state_dict(self) -> dict[str, Any]:
        self._fitted("cluster_centers_")
        return {**self._header(), "dims": dict(self.dims_), "target": self.target_,
                "centroids": self.cluster_centers_.copy(),
                "nets": {k: self._net_state(unwrap(v)) for k, v in self.nets_.items()},
                "silhouette": dict(self.silhouette_), "counters": dict(self.counters_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read_header(state)
        self.dims_ = {k: int(v) for k, v in state["dims"].items()}
        self.nets_ = self._new_nets(self.dims_["image"], self.dims_["text"])
        for k, v in self.nets_.items():
            v.load_state_dict(state["nets"][k])
            v.eval()
        self.target_ = state["target"]
        self.cluster_centers_ = np.asarray(state["centroids"], dtype=np.float32)
        self.silhouette_ = dict(state.get("silhouette", {}))
        self.counters_ = {k: int(v) for k, v in state.get("counters", {}).items()}
        self.n_iter_ = self.counters_.get("gen_steps", 0)
