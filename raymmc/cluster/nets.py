"""Small fully connected networks for feature-level deep clustering (DEC, JECL) and the
device / wrapping / batched-inference helpers every deep algorithm shares.

Model construction is kept apart from the training loops (``raymmc.cluster.dec`` /
``raymmc.cluster.jecl``): a loop receives modules that a caller may have wrapped (e.g. DDP via
Ray Train's ``prepare_model``), so every module's ``forward`` returns all the tensors a loss needs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Wrap = Callable[[nn.Module], nn.Module]


def identity_wrap(module: nn.Module) -> nn.Module:
    return module


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def mlp(dims: Sequence[int], activation: str = "relu", last_activation: bool = False,
        dropout: float = 0.0, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]``; activation after every layer but
    the last (unless ``last_activation``)."""
    act = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "elu": nn.ELU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        last = i == len(dims) - 2
        if not last or last_activation:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _dec_init(module: nn.Module, std: float | None) -> None:
    """DEC's reference init draws weights from N(0, 0.01^2); ``None`` keeps PyTorch's default."""
    if std is None:
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


class AutoEncoder(nn.Module):
    """Fully connected autoencoder ``d -> hidden... -> latent -> ...hidden -> d`` (mirrored).

    ``forward(x)`` returns ``(z, x_reconstructed)``; ``noise`` (training mode only) corrupts the
    input first: masking dropout of that rate (DEC's denoising AE used 0.2).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (500, 500, 2000), latent: int = 10,
                 activation: str = "relu", noise: float = 0.0, init_std: float | None = None):
        super().__init__()
        dims = [in_dim, *hidden, latent]
        self.encoder = mlp(dims, activation)
        self.decoder = mlp(dims[::-1], activation)
        self.noise = float(noise)
        self.in_dim, self.latent = in_dim, latent
        _dec_init(self, init_std)

    def corrupt(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Masking noise in training mode: ``keep`` (a bool mask of x's shape, drawn by the caller, e.g. keyed
        by item so that it does not depend on the worker) or, without it, dropout from torch's generator."""
        if not self.training or self.noise <= 0:
            return x
        if keep is not None:
            return x * keep.to(x.dtype)
        return nn.functional.dropout(x, self.noise, training=True) * (1.0 - self.noise)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(self.corrupt(x, keep))
        return z, self.decoder(z)


class ClusteringHead(nn.Module):
    """An encoder plus K trainable centroids: ``forward(x) -> (z, q)`` with DEC's Student-t q."""

    def __init__(self, encoder: nn.Module, centroids: torch.Tensor, alpha: float = 1.0):
        super().__init__()
        from raymmc.cluster.losses import student_t_soft_assign

        self._soft = student_t_soft_assign
        self.encoder = encoder
        self.centroids = nn.Parameter(centroids.clone().float())
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self._soft(z, self.centroids, self.alpha)


class TwoViewClusteringNet(nn.Module):
    """JECL's clustering network: image encoder + mu, text encoder + nu.
    ``forward(x, t) -> (z, q, v, r)``."""

    def __init__(self, image: ClusteringHead, text: ClusteringHead):
        super().__init__()
        self.image = image
        self.text = text

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        z, q = self.image(x)
        v, r = self.text(t)
        return z, q, v, r


def broadcast_buffers(module: nn.Module, ops) -> None:
    """Every worker takes rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at the start of
    each forward, so after the last training step each worker still holds its own last batch's update: without
    this, the workers' final models would differ (a collective: every worker calls it at the same point)."""
    if ops.world_size <= 1:
        return
    with torch.no_grad():
        for buf in unwrap(module).buffers():
            buf.copy_(ops.broadcast(buf, src=0))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


@torch.no_grad()
def forward_in_batches(module: nn.Module, *inputs: torch.Tensor, device: torch.device,
                       batch_size: int) -> tuple[torch.Tensor, ...]:
    """``module(*inputs)`` in eval mode, ``batch_size`` rows at a time (memory stays bounded at any
    shard size); every output concatenated on the CPU. Empty inputs give empty outputs of the right
    width (one forward pass on zero rows)."""
    was = module.training
    module.eval()
    n = len(inputs[0])
    # inputs take the network's float type (a float64 model fed float32 features, or the reverse)
    dtype = next((q.dtype for q in module.parameters() if q.is_floating_point()), None)
    outs = []
    for i in range(0, max(n, 1), batch_size):
        y = module(*(x[i:i + batch_size].to(device, dtype if dtype is not None and x.is_floating_point() else x.dtype)
                     for x in inputs))
        outs.append(tuple(t.float().cpu() for t in (y if isinstance(y, tuple) else (y,))))
    module.train(was)
    return tuple(torch.cat(parts) for parts in zip(*outs))
