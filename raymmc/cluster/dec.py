"""DEC (Xie, Girshick & Farhadi, ICML 2016) on one view of pre-extracted features, or both concatenated.

(Denoising) autoencoder pretraining -> seeded FAISS k-means on the embeddings initialises the
centroids -> self-training: minimise KL(P || Q) towards DEC's target P (``raymmc.cluster.selftrain``).
Items without the configured view are not trained on and cannot be assigned (``usable``): the
pipeline records them as rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from raymmc.cluster.base import MultiViewData
from raymmc.cluster.losses import global_soft_frequency, kl_div, target_distribution
from raymmc.cluster.nets import AutoEncoder, ClusteringHead, forward_in_batches, unwrap
from raymmc.cluster.pretrain import AEConfig
from raymmc.cluster.selftrain import SelfTrainingClusterer, SelfTrainingModelConfig
from raymmc.cluster.views import ConfiguredView, view_matrix


@dataclass
class DECConfig(SelfTrainingModelConfig):
    view: Literal["image", "text", "concat"] = "image"
    ae: AEConfig = field(default_factory=AEConfig)


def build_autoencoder(in_dim: int, a: AEConfig) -> AutoEncoder:
    return AutoEncoder(in_dim, a.hidden, a.latent, a.activation, a.noise, a.init_std)


class _KLObjective:
    """DEC's target and loss on the local rows ``x``."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, ops, device: torch.device, eval_batch: int):
        self.net, self.x, self.ops, self.device, self.eval_batch = net, x, ops, device, eval_batch

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, q = forward_in_batches(unwrap(self.net), self.x, device=self.device, batch_size=self.eval_batch)
        return target_distribution(q, global_soft_frequency(q, self.ops)), q.argmax(1)

    def loss(self, idx: np.ndarray, p: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
        i = torch.from_numpy(idx)
        _, q = self.net(self.x[i].to(self.device))
        return {"loss": kl_div(p[i].to(self.device), q) * weight}


class DEC(ConfiguredView, SelfTrainingClusterer):
    """Deep Embedded Clustering on ``config.view``; ``cluster_centers_`` live in the embedding space."""

    name = "dec"
    Config = DECConfig

    def _features(self, data: MultiViewData) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return view_matrix(data, c.view, c.normalize_input, c.input_scale)

    def _rows(self, data: MultiViewData) -> dict[str, torch.Tensor]:
        feats, has = self._features(data)
        return {"x": torch.from_numpy(feats[has])}

    def _autoencoders(self, dims: list[int]) -> dict[str, torch.nn.Module]:
        return {self.config.view: build_autoencoder(dims[0], self.config.ae)}

    def _pretrain_sets(self, rows):
        return {self.config.view: (rows["x"], None, self.config.ae)}

    def _items(self, data: MultiViewData) -> np.ndarray:
        return super()._items(data)[self._features(data)[1]]

    def _initialise(self, aes, rows, ops) -> torch.nn.Module:
        encoder = aes[self.config.view].encoder
        centers = self._init_kmeans(self._embed_rows(encoder, rows["x"]), rows["key"], ops)
        return ClusteringHead(encoder, centers, self.config.cluster.alpha)

    def _empty_net(self, dims: list[int]) -> torch.nn.Module:
        c = self.config
        return ClusteringHead(build_autoencoder(dims[0], c.ae).encoder, torch.zeros(self.n_clusters, c.ae.latent),
                              c.cluster.alpha)

    def _objective(self, net, rows, ops) -> _KLObjective:
        return _KLObjective(net, rows["x"], ops, self.device, self.config.eval_batch_size)

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self._check_fitted().centroids.detach().cpu().numpy()

    def embed(self, data: MultiViewData) -> np.ndarray:
        self.check_usable(data)
        return self._embed_rows(self._check_fitted().encoder, torch.from_numpy(self._features(data)[0])).numpy()

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        net = self._check_fitted()
        self.check_usable(data)
        x = torch.from_numpy(self._features(data)[0])
        return forward_in_batches(net, x, device=self.device, batch_size=self.config.eval_batch_size)[1] \
            .double().numpy()
