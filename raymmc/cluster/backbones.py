"""Backbones for MMDC: a small VGG-style ConvNet for MNIST-size images and a CIFAR-style ResNet-18.

Both map an image batch (B, C, H, W) float in [0, 1] to

* ``forward(x)`` / ``forward(x, head="cluster")``: the L2-normalised clustering output (B, out_dim);
* ``forward(x, head="rotation")``: logits of the auxiliary rotation task (B, 4) (0/90/180/270 degrees);
* ``forward(x, head="features")``: the pooled backbone features (B, feature_dim).

The two heads share the trunk. Under DistributedDataParallel the clustering and rotation steps each use one
head only, so wrap with ``find_unused_parameters=True``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

Head = Literal["cluster", "rotation", "features"]


class _TwoHeaded(nn.Module):
    """Trunk -> features; a linear clustering head (L2-normalised) and a linear rotation head."""

    feature_dim: int

    def __init__(self, feature_dim: int, out_dim: int, rotation_head: bool):
        super().__init__()
        self.feature_dim = feature_dim
        self.out_dim = out_dim
        self.cluster_head = nn.Linear(feature_dim, out_dim)
        self.rotation_head = nn.Linear(feature_dim, 4) if rotation_head else None

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, head: Head = "cluster") -> torch.Tensor:
        h = self.features(x)
        if head == "features":
            return h
        if head == "rotation":
            if self.rotation_head is None:
                raise RuntimeError("this backbone was built without a rotation head")
            return self.rotation_head(h)
        if head != "cluster":
            raise ValueError(f"unknown head {head!r}")
        return F.normalize(self.cluster_head(h), dim=1, eps=1e-12)

    def _init_heads(self, head_init: str) -> None:
        """``"small"``: weights N(0, 0.01), zero bias (the public code). ``"default"``: PyTorch's Linear init.

        With L2-normalised outputs the gradient reaching the head scales like 1 / |W h|; from a tiny W the first
        SGD steps are huge and inflate |W| (measured here: |W| 20 vs 8.6, |W h| ~150 vs ~30), after which the
        effective learning rate of the clustering output is ~|W h|^-2 smaller and training stalls in its early
        partition. ``"default"`` starts |W h| at O(|h|) and avoids that."""
        if head_init == "default":
            return
        if head_init != "small":
            raise ValueError(f"unknown head_init {head_init!r}")
        heads = [self.cluster_head] + ([self.rotation_head] if self.rotation_head is not None else [])
        for m in heads:
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class SmallConvNet(_TwoHeaded):
    """VGG-style ConvNet for small (e.g. 28x28 or 32x32) images: four [conv3x3-BN-ReLU, maxpool2] stages
    (32, 64, 128, 256 channels), flatten the final 2x2 map (1024 features). Max-pooling rounds up (ceil mode), so
    28x28 inputs end on 2x2 (28-14-7-4-2) like 32x32 ones do; with floor mode the last stage would be 1x1 and the
    spatial layout of the digit lost. Other sizes are average-pooled to 2x2."""

    def __init__(self, in_channels: int = 1, out_dim: int = 10, rotation_head: bool = True,
                 widths: tuple[int, ...] = (32, 64, 128, 256), head_init: str = "default"):
        super().__init__(feature_dim=widths[-1] * 4, out_dim=out_dim, rotation_head=rotation_head)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            c = w
        layers.append(nn.AdaptiveAvgPool2d(2))
        self.trunk = nn.Sequential(*layers)
        for m in self.trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self._init_heads(head_init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.trunk(x), 1)


class CifarResNet18(_TwoHeaded):
    """torchvision's ResNet-18 with a CIFAR-style stem: a 3x3 stride-1 first convolution and no max-pool,
    so 32x32 inputs keep 32x32 maps in layer1 (512 features after global average pooling)."""

    def __init__(self, in_channels: int = 3, out_dim: int = 10, rotation_head: bool = True,
                 head_init: str = "default"):
        super().__init__(feature_dim=512, out_dim=out_dim, rotation_head=rotation_head)
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.trunk = net
        self._init_heads(head_init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def build_backbone(name: str, in_channels: int, out_dim: int, rotation_head: bool = True,
                   widths: tuple[int, ...] = (32, 64, 128, 256), head_init: str = "default") -> _TwoHeaded:
    """``"convnet"`` (small VGG-style, for MNIST-size images; ``widths`` = its stage channels) or ``"resnet18"``
    (CIFAR-style)."""
    if name == "convnet":
        return SmallConvNet(in_channels=in_channels, out_dim=out_dim, rotation_head=rotation_head, widths=widths,
                            head_init=head_init)
    if name == "resnet18":
        return CifarResNet18(in_channels=in_channels, out_dim=out_dim, rotation_head=rotation_head,
                             head_init=head_init)
    raise ValueError(f"unknown backbone {name!r} (expected 'convnet' or 'resnet18')")
