"""The one autoencoder pretrainer (DEC, JECL, DM2C): reconstruction loss with Adam, lock-step batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from raymmc.cluster.base import GlobalOps
from raymmc.cluster.nets import unwrap
from raymmc.cluster.sampler import EpochSampler
from raymmc.hashing import keyed_keep_mask

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def mse(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(x_rec, x)


def pretrain_autoencoder(model: nn.Module, x: torch.Tensor, *, epochs: int, lr: float, weight_decay: float,
                         sampler: EpochSampler, ops: GlobalOps, device: torch.device, loss: Loss = mse,
                         report: Callable[[dict], None] | None = None, view: str = "") -> list[float]:
    """Train ``model(x) -> (z, x_rec)`` (maybe DDP-wrapped) to reconstruct the local rows ``x`` for
    ``epochs`` epochs of ``sampler.steps`` steps. Returns each epoch's mean loss over all workers
    (weighted by rows); ``report`` gets ``{"phase": "pretrain", "view", "epoch", "loss"}``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    model.train()
    noise = float(getattr(unwrap(model), "noise", 0.0))
    for epoch in range(epochs):
        tot = torch.zeros(2, dtype=torch.float64)
        for _ in range(sampler.steps):
            xb = x[torch.from_numpy(sampler.next())].to(device)
            # a keyed sampler draws the masking noise from the rows' keys too: the same for any worker count
            keep = torch.from_numpy(keyed_keep_mask(sampler.noise_keys(), xb.shape[1], noise)).to(device) \
                if sampler.keyed and noise > 0 else None
            _, rec = model(xb, keep) if keep is not None else model(xb)
            # An empty batch (a worker with no rows) still joins DDP's gradient all-reduce.
            value = loss(xb, rec) if len(xb) else rec.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            # sampler.weight: DDP's mean of the workers' gradients is then the global batch mean's
            (value * sampler.weight).backward()
            opt.step()
            tot += torch.tensor([float(value.detach()) * len(xb), len(xb)], dtype=torch.float64)
        tot = ops.all_reduce_sum(tot)
        history.append(float(tot[0] / max(float(tot[1]), 1.0)))
        if report is not None:
            report({"phase": "pretrain", "view": view, "epoch": epoch, "loss": history[-1]})
    return history
