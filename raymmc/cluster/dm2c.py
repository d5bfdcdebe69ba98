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

Schedules (``critic_schedule``): ``"paper"`` = Algorithm 1 / WGAN: ``n_critic`` critic steps (fresh
batches each) before every generator step; ``"public_code"`` = the authors' released code: one critic
step after every ``public_code_gen_per_critic`` (5) generator steps, on that generator step's batch.

Distributed use (Ray Train): the six networks are built by :meth:`DM2C.build_nets` and passed through
the ``wrap`` hook (e.g. DDP); each worker samples batches from its local shard; the number of steps
per epoch comes from global item counts (``ops.all_reduce_sum``) so every worker runs the same number
of steps; the k-means sample and the ``"auto"`` target choice use ``ops.all_gather_cat``; centroids
and the target are broadcast from rank 0.

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

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.kmeans import kmeans, l2_normalize, soft_from_distances
from raymmc.cluster.nets import resolve_device, unwrap

Wrap = Callable[[nn.Module], nn.Module]
MODALITIES = ("image", "text")


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
    kmeans_sample: int | None = None  # max items per worker gathered for k-means (None: all)
    auto_sample: int = 2000  # max items per modality for the "auto" silhouette
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.critic_schedule not in ("paper", "public_code"):
            raise ValueError(f"critic_schedule must be 'paper' or 'public_code', got {self.critic_schedule!r}")
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

class _Pool:
    """Endless seeded shuffled stream of full-size batches from one modality's local rows."""

    def __init__(self, x: torch.Tensor, batch_size: int, rng: np.random.Generator):
        self.x, self.rng = x, rng
        self.bs = max(2, min(batch_size, len(x)))  # BatchNorm needs >= 2 rows
        self.order = np.empty(0, dtype=np.int64)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > len(self.order):
            rest = self.order[self.pos:]
            self.order = np.concatenate([rest, self.rng.permutation(len(self.x))])
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return self.x[torch.from_numpy(idx)]


class DM2C(Clusterer):
    """Deep mixed-modal clustering. ``fit`` -> ``predict`` / ``soft_assign`` / ``embed``.

    ``wrap(module) -> module`` is applied to each of the six networks after they are built (DDP under
    Ray Train); ``on_epoch(dict)`` receives the mean losses of every pretraining / adversarial epoch.
    """

    def __init__(self, n_clusters: int, config: DM2CConfig | None = None, *, wrap: Wrap | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None):
        self.n_clusters = int(n_clusters)
        self.config = config or DM2CConfig()
        self.wrap = wrap or (lambda m: m)
        self.on_epoch = on_epoch
        self.device = resolve_device(self.config.device)
        self.nets: dict[str, nn.Module] | None = None  # raw (unwrapped) modules
        self.centroids: np.ndarray | None = None
        self.target_: str | None = None
        self.dims_: dict[str, int] | None = None
        self.silhouette_: dict[str, float] = {}
        self.counters_: dict[str, int] = {"pretrain_steps": 0, "gen_steps": 0, "critic_steps": 0}
        self.history_: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------- building
    def build_nets(self, d_image: int, d_text: int) -> dict[str, nn.Module]:
        """The six networks (seeded by ``config.seed``), on ``self.device``, unwrapped."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            nets = self._new_nets(d_image, d_text)
        for n in ("d_i", "d_t"):
            clip_weights(nets[n], cfg.clip)  # a critic starts inside its clipping box
        self.dims_ = {"image": int(d_image), "text": int(d_text)}
        return {k: v.to(self.device) for k, v in nets.items()}

    def _new_nets(self, d_image: int, d_text: int) -> dict[str, nn.Module]:
        cfg = self.config
        return {
            "ae_i": ModalityAE(d_image, cfg.image_hidden, cfg.latent_dim),
            "ae_t": ModalityAE(d_text, cfg.text_hidden, cfg.latent_dim),
            "g_it": mapping_net(cfg.latent_dim, cfg.mapping_hidden),
            "g_ti": mapping_net(cfg.latent_dim, cfg.mapping_hidden),
            "d_i": critic_net(cfg.latent_dim, cfg.critic_hidden),
            "d_t": critic_net(cfg.latent_dim, cfg.critic_hidden),
        }

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return l2_normalize(x) if self.config.input_norm == "l2" else x

    def _modal_rows(self, data: MultiViewData) -> dict[str, torch.Tensor]:
        if data.image is None or data.text is None:
            raise ValueError("DM2C needs both an image and a text feature matrix (rows of missing views are ignored)")
        if np.any(~(data.has_image | data.has_text)):
            raise ValueError("every item needs an image or a text")
        out = {}
        for m, x, has in (("image", data.image, data.has_image), ("text", data.text, data.has_text)):
            out[m] = torch.from_numpy(self._prep(x[has])).to(self.device)
        return out

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "DM2C":
        cfg = self.config
        rows = self._modal_rows(data)
        # collectives get tensors on the training device (NCCL needs CUDA tensors)
        counts = ops.all_reduce_sum(torch.tensor([len(rows["image"]), len(rows["text"])], dtype=torch.float64,
                                                 device=self.device)).cpu()
        n_img, n_txt = int(counts[0]), int(counts[1])
        if min(n_img, n_txt) < 2:
            raise ValueError(f"DM2C needs >= 2 items of each modality, got {n_img} images and {n_txt} texts")
        if min(len(rows["image"]), len(rows["text"])) < 2:
            raise ValueError("every worker needs >= 2 local items of each modality")
        resume = self.resume_state or {}
        self.counters_ = {"pretrain_steps": 0, "gen_steps": 0, "critic_steps": 0}
        self.history_ = []
        raw = self.build_nets(data.image.shape[1], data.text.shape[1])
        resumed = resume.get("phase") == "pretrained"
        if resumed:  # all six networks: the mappings and critics keep their initial weights too
            for k, v in raw.items():
                v.load_state_dict(resume["nets"][k])
            self.counters_, self.history_ = dict(resume["counters"]), list(resume["history"])
            self.history_.append({"phase": "resumed", "from": "pretrained"})
        self.nets = raw
        net = {k: self.wrap(v) for k, v in raw.items()}
        rng = np.random.default_rng([cfg.seed, ops.rank])
        pools = {m: _Pool(rows[m], cfg.batch_size, rng) for m in MODALITIES}
        world = max(1, ops.world_size)
        if resumed and ops.world_size == 1:  # one process: its streams continue as if never interrupted
            rng.bit_generator.state = resume["rng"]["numpy"]
            torch.set_rng_state(resume["rng"]["torch"])
            for m in MODALITIES:
                pools[m].order, pools[m].pos = resume["pools"][m]["order"].copy(), int(resume["pools"][m]["pos"])

        # 1) autoencoder pretraining, each modality on its own items
        for m, key in () if resumed else (("image", "ae_i"), ("text", "ae_t")):
            n_glob = n_img if m == "image" else n_txt
            steps = max(1, math.ceil(n_glob / (pools[m].bs * world)))
            opt = torch.optim.Adam(net[key].parameters(), lr=cfg.lr_ae, weight_decay=cfg.weight_decay)
            net[key].train()
            for ep in range(cfg.pretrain_epochs):
                tot = 0.0
                for _ in range(steps):
                    x = pools[m].next()
                    _, xr = net[key](x)
                    loss = reconstruction_loss(x, xr, cfg.loss_reduction)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    self.counters_["pretrain_steps"] += 1
                    tot += float(loss.detach())
                self._report({"phase": "pretrain", "modality": m, "epoch": ep, "recon": tot / steps})
        if self.checkpoint_fn is not None and not resumed:
            self.checkpoint_fn(copy.deepcopy({
                "phase": "pretrained", "nets": {k: v.state_dict() for k, v in raw.items()},
                "counters": self.counters_, "history": self.history_,
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                "pools": {m: {"order": pools[m].order, "pos": pools[m].pos} for m in MODALITIES}}))

        # 2) adversarial training
        self.train_adversarial(net, pools, n_img, n_txt, world)

        # 3) unify and cluster
        for v in raw.values():
            v.eval()
        self.target_ = self._choose_target(rows, ops)
        z = self._embed_tensor(data)
        self.centroids = self._global_kmeans(z, ops)
        return self

    def train_adversarial(self, net: dict[str, nn.Module], pools: dict[str, _Pool], n_img: int, n_txt: int,
                          world: int = 1) -> None:
        """The adversarial phase: ``adv_epochs`` x steps-per-epoch generator steps, with the critic
        schedule of the config. Works on (possibly wrapped) ``net``."""
        cfg = self.config
        bs = max(pools["image"].bs, pools["text"].bs)
        steps = max(1, math.ceil(max(n_img, n_txt) / (bs * world)))
        ae_params = list(net["ae_i"].parameters()) + list(net["ae_t"].parameters())
        g_params = list(net["g_it"].parameters()) + list(net["g_ti"].parameters())
        opt_g = torch.optim.RMSprop([{"params": ae_params, "lr": cfg.lr_ae}, {"params": g_params, "lr": cfg.lr_g}],
                                    lr=cfg.lr_g, weight_decay=cfg.weight_decay)
        d_params = list(net["d_i"].parameters()) + list(net["d_t"].parameters())
        opt_d = torch.optim.RMSprop(d_params, lr=cfg.lr_d, weight_decay=cfg.weight_decay)
        for v in net.values():
            v.train()

        def critic_step(z_i, z_t, fake_i, fake_t) -> tuple[float, float]:
            w_i = critic_objective(net["d_i"], z_i, fake_i)
            w_t = critic_objective(net["d_t"], z_t, fake_t)
            opt_d.zero_grad(set_to_none=True)
            (-(w_i + w_t)).backward()
            opt_d.step()
            clip_weights(net["d_i"], cfg.clip)
            clip_weights(net["d_t"], cfg.clip)
            self.counters_["critic_steps"] += 1
            return float(w_i.detach()), float(w_t.detach())

        def fresh_critic_batch():
            with torch.no_grad():
                z_i, _ = net["ae_i"](pools["image"].next())
                z_t, _ = net["ae_t"](pools["text"].next())
                return z_i, z_t, net["g_ti"](z_t), net["g_it"](z_i)

        for ep in range(cfg.adv_epochs):
            sums = {"total": 0.0, "recon": 0.0, "cycle": 0.0, "adv": 0.0, "w_i": 0.0, "w_t": 0.0}
            n_crit = 0
            for _ in range(steps):
                if cfg.critic_schedule == "paper":
                    for _ in range(cfg.n_critic):
                        wi, wt = critic_step(*fresh_critic_batch())
                        sums["w_i"] += wi
                        sums["w_t"] += wt
                        n_crit += 1
                out = generator_losses(net["ae_i"], net["ae_t"], net["g_it"], net["g_ti"], net["d_i"], net["d_t"],
                                       pools["image"].next(), pools["text"].next(), cfg)
                opt_g.zero_grad(set_to_none=True)
                out["total"].backward()
                opt_g.step()
                self.counters_["gen_steps"] += 1
                for k in ("total", "recon", "cycle", "adv"):
                    sums[k] += float(out[k].detach())
                if (cfg.critic_schedule == "public_code"
                        and self.counters_["gen_steps"] % cfg.public_code_gen_per_critic == 0):
                    wi, wt = critic_step(out["z_i"], out["z_t"], out["fake_i"], out["fake_t"])
                    sums["w_i"] += wi
                    sums["w_t"] += wt
                    n_crit += 1
            rec = {"phase": "adversarial", "epoch": ep}
            rec.update({k: sums[k] / steps for k in ("total", "recon", "cycle", "adv")})
            rec.update({k: (sums[k] / n_crit if n_crit else float("nan")) for k in ("w_i", "w_t")})
            rec["critic_steps"] = n_crit
            self._report(rec)

    def _report(self, rec: dict[str, Any]) -> None:
        self.history_.append(rec)
        if self.on_epoch is not None:
            self.on_epoch(rec)

    # ------------------------------------------------------------------------- unify and cluster
    @torch.no_grad()
    def _latents(self, rows: torch.Tensor, modality: str) -> torch.Tensor:
        ae = self.nets["ae_i" if modality == "image" else "ae_t"]
        ae.eval()
        return ae.encoder(rows) if len(rows) else rows.new_zeros((0, self.config.latent_dim))

    def _choose_target(self, rows: dict[str, torch.Tensor], ops: GlobalOps) -> str:
        if self.config.target_modality != "auto":
            return self.config.target_modality
        from sklearn.metrics import silhouette_score

        cfg = self.config
        scores = {}
        rng = np.random.default_rng([cfg.seed, 7, ops.rank])
        for m in MODALITIES:
            z = self._latents(rows[m], m)
            if cfg.embed_norm == "l2":  # judge each space in the geometry k-means will see
                z = torch.nn.functional.normalize(z, dim=1)
            take = max(1, cfg.auto_sample // max(1, ops.world_size))
            if len(z) > take:
                z = z[torch.from_numpy(np.sort(rng.choice(len(z), take, replace=False))).to(z.device)]
            zall = ops.all_gather_cat(z).cpu().numpy().astype(np.float32)
            k = min(self.n_clusters, len(zall) - 1)
            if k < 2:
                scores[m] = -1.0
                continue
            _, lab, _ = kmeans(zall, k, seed=cfg.seed, niter=cfg.kmeans_niter, nredo=cfg.kmeans_nredo)
            scores[m] = float(silhouette_score(zall, lab)) if len(np.unique(lab)) > 1 else -1.0
        self.silhouette_ = scores
        pick = torch.tensor([0.0 if scores["image"] >= scores["text"] else 1.0], dtype=torch.float64,
                            device=self.device)
        pick = ops.broadcast(pick, src=0).cpu()
        return "image" if float(pick[0]) == 0.0 else "text"

    @torch.no_grad()
    def _embed_tensor(self, data: MultiViewData) -> torch.Tensor:
        if self.nets is None or self.target_ is None:
            raise RuntimeError("DM2C is not fitted")
        for v in self.nets.values():
            v.eval()
        n = len(data)
        tgt = self.target_
        other = "text" if tgt == "image" else "image"
        has = {"image": np.asarray(data.has_image, bool), "text": np.asarray(data.has_text, bool)}
        if np.any(~(has["image"] | has["text"])):
            raise ValueError("every item needs an image or a text")
        feats = {"image": data.image, "text": data.text}
        out = torch.zeros((n, self.config.latent_dim), device=self.device)
        own = has[tgt]
        if own.any():
            x = torch.from_numpy(self._prep(feats[tgt][own])).to(self.device)
            out[torch.from_numpy(np.flatnonzero(own)).to(self.device)] = self._latents(x, tgt)
        mapped = ~own  # these have only the other modality
        if mapped.any():
            x = torch.from_numpy(self._prep(feats[other][mapped])).to(self.device)
            g = self.nets["g_ti" if tgt == "image" else "g_it"]
            out[torch.from_numpy(np.flatnonzero(mapped)).to(self.device)] = g(self._latents(x, other))
        if self.config.embed_norm == "l2":
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    def _global_kmeans(self, z: torch.Tensor, ops: GlobalOps) -> np.ndarray:
        cfg = self.config
        if cfg.kmeans_sample is not None and len(z) > cfg.kmeans_sample:
            rng = np.random.default_rng([cfg.seed, 11, ops.rank])
            z = z[torch.from_numpy(np.sort(rng.choice(len(z), cfg.kmeans_sample, replace=False))).to(z.device)]
        zall = ops.all_gather_cat(z).cpu().numpy()
        cent, _, self.inertia_ = kmeans(zall, self.n_clusters, seed=cfg.seed, niter=cfg.kmeans_niter,
                                        nredo=cfg.kmeans_nredo)
        cent_t = ops.broadcast(torch.from_numpy(cent).to(self.device), src=0)
        return cent_t.cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------------------- interface
    def embed(self, data: MultiViewData) -> np.ndarray:
        """Every item in the target modality's latent space (the other modality through G)."""
        return self._embed_tensor(data).cpu().numpy()

    def _sq_dist(self, data: MultiViewData) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("DM2C is not fitted")
        z = self.embed(data).astype(np.float64)
        c = self.centroids.astype(np.float64)
        return np.maximum((z * z).sum(1)[:, None] - 2 * z @ c.T + (c * c).sum(1)[None, :], 0.0)

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        return soft_from_distances(self._sq_dist(data))

    def predict(self, data: MultiViewData) -> np.ndarray:
        return self._sq_dist(data).argmin(axis=1)

    def state_dict(self) -> dict[str, Any]:
        if self.nets is None:
            raise RuntimeError("DM2C is not fitted")
        return {
            "n_clusters": self.n_clusters, "config": asdict(self.config), "dims": dict(self.dims_),
            "target": self.target_, "centroids": None if self.centroids is None else self.centroids.copy(),
            "nets": {k: {n: t.detach().cpu().clone() for n, t in unwrap(v).state_dict().items()}
                     for k, v in self.nets.items()},
            "silhouette": dict(self.silhouette_), "counters": dict(self.counters_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_clusters = int(state["n_clusters"])
        cfg = dict(state["config"])
        self.config = DM2CConfig(**cfg)
        self.device = resolve_device(self.config.device)
        self.nets = self.build_nets(state["dims"]["image"], state["dims"]["text"])
        for k, v in self.nets.items():
            v.load_state_dict(state["nets"][k])
            v.eval()
        self.target_ = state["target"]
        self.centroids = None if state["centroids"] is None else np.asarray(state["centroids"], dtype=np.float32)
        self.silhouette_ = dict(state.get("silhouette", {}))
        self.counters_ = dict(state.get("counters", self.counters_))

