"""Tiny DEC and JECL fits on separable synthetic two-view data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score as nmi

from raymmc.cluster.base import GlobalOps, MultiViewData, make_config
from raymmc.cluster.dec import DEC, DECConfig
from raymmc.cluster.jecl import JECL, JECLConfig, combine, jecl_loss
from raymmc.cluster.protocols import drop_captions
from raymmc.cluster.registry import make_clusterer
from raymmc.io import safestate

K = 4
SMALL_AE = {"hidden": [32], "latent": 4, "epochs": 20, "batch_size": 64}
SMALL = {"image_ae": SMALL_AE, "text_ae": SMALL_AE, "init": {"nredo": 3},
         "cluster": {"batch_size": 64, "max_iter": 200}, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth():
    rng = np.random.default_rng(0)
    n = 240
    y = np.repeat(np.arange(K), n // K)
    ci = rng.normal(size=(K, 20)) * 3
    ct = rng.normal(size=(K, 12)) * 3
    image = (ci[y] + rng.normal(size=(n, 20))).astype(np.float32)
    text = (ct[y] + rng.normal(size=(n, 12))).astype(np.float32)
    return MultiViewData(image=image, text=text), y


def dec_cfg(view="image"):
    return {"view": view, "ae": SMALL_AE, "init": {"nredo": 3}, "cluster": {"batch_size": 64, "max_iter": 200},
            "device": "cpu"}


def test_dec_fits_separable_data(synth):
    data, y = synth
    log = []
    m = DEC(K, dec_cfg("image"), seed=0, on_epoch=log.append).fit(data)
    assert nmi(y, m.predict(data)) > 0.8
    q = m.soft_assign(data)
    assert q.shape == (len(y), K) and np.allclose(q.sum(1), 1.0)
    assert m.embed(data).shape == (len(y), 4)
    phases = {d["phase"] for d in log}
    assert phases == {"pretrain", "self_training"}
    assert any("delta_label" in d for d in log)
    # text view and concat work too
    assert nmi(y, DEC(K, dec_cfg("text"), seed=0).fit(data).predict(data)) > 0.8


def test_dec_state_dict_roundtrip(synth):
    data, y = synth
    m = DEC(K, dec_cfg(), seed=1).fit(data)
    m2 = DEC(K)
    m2.load_state_dict(safestate.loads(safestate.dumps(m.state_dict())))
    assert m2.config == m.config
    np.testing.assert_allclose(m2.soft_assign(data), m.soft_assign(data), atol=1e-6)
    assert (m2.predict(data) == m.predict(data)).all()


def test_dec_is_seeded(synth):
    data, _ = synth
    a = DEC(K, dec_cfg(), seed=3).fit(data).soft_assign(data)
    b = DEC(K, dec_cfg(), seed=3).fit(data).soft_assign(data)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dec_never_assigns_an_item_without_its_view(synth):
    data, _ = synth
    m = DEC(K, dec_cfg("text"), seed=0).fit(data)
    has_text = np.ones(len(data), bool)
    has_text[:10] = False
    partial = MultiViewData(image=data.image, text=data.text, has_text=has_text)
    assert (m.usable(partial) == has_text).all()
    with pytest.raises(ValueError, match="10 of 240 items have no view dec uses"):
        m.predict(partial)
    # fitted on it: trained on the items with a caption, the others labelled -1 (not cluster 0)
    m2 = DEC(K, dec_cfg("text"), seed=0).fit(partial)
    assert (m2.labels_[:10] == -1).all() and (m2.labels_[10:] >= 0).all()
    keep = np.flatnonzero(m2.usable(partial))
    assert (m2.predict(partial.subset(keep)) == m2.labels_[keep]).all()


@pytest.fixture(scope="module")
def jecl_fit(synth):
    data, _ = synth
    torch.set_num_threads(1)
    return JECL(K, SMALL, seed=0).fit(data)


def test_jecl_fits_separable_data(synth, jecl_fit):
    data, y = synth
    assert nmi(y, jecl_fit.predict(data)) > 0.8
    s = jecl_fit.soft_assign(data)
    assert s.shape == (len(y), K) and np.allclose(s.sum(1), 1.0)
    q, r = jecl_fit.view_assignments(data)
    # after matching and joint training the two views agree on nearly every item
    assert (q.argmax(1) == r.argmax(1)).mean() > 0.9
    assert jecl_fit.embed(data).shape == (len(y), 8)
    assert jecl_fit.config.init_mode == "joint" and jecl_fit.init_agreement_ is None  # aligned by construction


def test_jecl_state_dict_roundtrip(synth, jecl_fit):
    data, _ = synth
    m2 = JECL(K)
    m2.load_state_dict(safestate.loads(safestate.dumps(jecl_fit.state_dict())))
    np.testing.assert_allclose(m2.soft_assign(data), jecl_fit.soft_assign(data), atol=1e-6)
    assert (m2.predict(data) == jecl_fit.predict(data)).all()
    assert m2.config == jecl_fit.config


def test_float64_precision_trains_and_reloads_in_float64(synth):
    """``precision: float64`` (workers-count-independent fits): every trained weight is float64, float32
    features are accepted, and the saved model reloads as float64 with the same assignments."""
    data, y = synth
    m = JECL(K, {**SMALL, "precision": "float64"}, seed=0).fit(data)
    assert {p.dtype for p in m.net_.parameters()} == {torch.float64}
    assert nmi(y, m.predict(data)) > 0.8
    m2 = JECL(K)
    m2.load_state_dict(safestate.loads(safestate.dumps(m.state_dict())))
    assert {p.dtype for p in m2.net_.parameters()} == {torch.float64}
    np.testing.assert_array_equal(m2.soft_assign(data), m.soft_assign(data))
    d = DEC(K, {**dec_cfg(), "precision": "float64"}, seed=0).fit(data)
    assert d.cluster_centers_.dtype == np.float64 and nmi(y, d.predict(data)) > 0.8


def test_jecl_missing_captions(synth):
    data, y = synth
    half = drop_captions(data, 0.5, seed=0)
    m = JECL(K, SMALL, seed=0).fit(half)
    assert nmi(y, m.predict(half)) > 0.8
    q, r = m.view_assignments(half)
    s = m.soft_assign(half)
    no = ~half.has_text
    np.testing.assert_allclose(s[no], q[no], atol=1e-6)  # q alone without caption
    lam = m.config.lam
    np.testing.assert_allclose(s[~no], lam * q[~no] + (1 - lam) * r[~no], atol=1e-6)


def test_jecl_per_view_init_matches_clusters(synth):
    data, y = synth
    m = JECL(K, {**SMALL, "init_mode": "per_view"}, seed=0).fit(data)
    assert nmi(y, m.predict(data)) > 0.8
    assert m.init_agreement_ > 0.8  # the matched image and text k-means agree on the paired items


def test_jecl_joint_init_falls_back_without_enough_pairs(synth):
    data, y = synth
    n = len(y)
    has_image = np.arange(n) < n // 2 + 2  # 2 paired items (K = 4): each view's k-means instead
    has_text = np.arange(n) >= n // 2
    mixed = MultiViewData(image=data.image * has_image[:, None], text=data.text * has_text[:, None],
                          has_image=has_image, has_text=has_text)
    m = JECL(K, SMALL, seed=0).fit(mixed)
    assert {"phase": "init_fallback", "from": "joint", "to": "per_view", "paired_items": 2} in m.history_
    assert m.init_agreement_ is not None


def test_jecl_input_init_starts_from_concatenated_kmeans(synth):
    data, y = synth
    half = drop_captions(data, 0.5, seed=0)
    m = JECL(K, {**SMALL, "init_mode": "input"}, seed=0).fit(half)
    assert nmi(y, m.predict(half)) > 0.8
    # mu / nu: per cluster, the mean latent over its rows that have that view (a caption-less row adds nothing
    # to nu); a cluster without any such row (here 3 of K = 4) gets zeros
    labels = torch.tensor([0, 0, 1, 1, 2])
    z = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    v = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    hi = torch.tensor([True, True, True, False, True])
    ht = torch.tensor([True, False, True, True, False])
    mu, nu = m._view_means(labels, z, v, hi, ht, GlobalOps())
    assert torch.allclose(mu, torch.tensor([[1.0, 2.0], [4.0, 5.0], [8.0, 9.0], [0.0, 0.0]]))
    assert torch.allclose(nu, torch.tensor([[0.0, 1.0, 2.0], [7.5, 8.5, 9.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_jecl_loss_terms_and_switches():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(6, 3), 1)
    r = torch.softmax(torch.randn(6, 3), 1)
    p = torch.softmax(torch.randn(6, 3), 1)
    hi = torch.ones(6, dtype=torch.bool)
    ht = torch.tensor([True, True, True, False, False, False])
    full = jecl_loss(p, q, r, hi, ht, beta=0.1, gamma=0.1)
    noalign = jecl_loss(p, q, r, hi, ht, beta=0.1, gamma=0.1, align=False)
    noreg = jecl_loss(p, q, r, hi, ht, beta=0.1, gamma=0.1, regularize=False)
    assert float(full["jsd"]) > 0 and float(full["reg"]) > 0
    assert torch.isclose(full["loss"] - noalign["loss"], 0.1 * full["jsd"])
    assert torch.isclose(full["loss"] - noreg["loss"], 0.1 * full["reg"])
    # rows without caption: no text KL, no JSD
    r2 = r.clone()
    r2[3:] = torch.tensor([1.0, 0.0, 0.0])
    other = jecl_loss(p, q, r2, hi, ht, beta=0.1, gamma=0.1)
    for key in ("kl_image", "kl_text", "jsd", "reg"):
        assert torch.isclose(other[key], full[key]), key
    # final assignment
    s = combine(q, r, hi, ht, 0.5)
    assert torch.allclose(s[:3], 0.5 * (q[:3] + r[:3])) and torch.allclose(s[3:], q[3:])


def test_ablation_switches_change_training(synth):
    data, _ = synth
    base = JECL(K, SMALL, seed=0).fit(data).soft_assign(data)
    for switch in ({"align": False}, {"regularize": False}):
        other = JECL(K, {**SMALL, **switch}, seed=0).fit(data).soft_assign(data)
        assert not np.allclose(base, other, atol=1e-5), switch


def test_config_from_dict_and_registry():
    cfg = make_config(JECLConfig, {"lam": 0.3, "image_ae": {"hidden": [8], "latent": 2}})
    assert cfg.lam == 0.3 and cfg.image_ae.hidden == (8,) and cfg.text_ae.hidden == JECLConfig().text_ae.hidden
    with pytest.raises(ValueError):
        make_config(DECConfig, {"nope": 1})
    assert isinstance(make_clusterer("dec", 3, {"view": "text"}, seed=2), DEC)
    m = make_clusterer("jecl", 3, cfg, seed=5)
    assert isinstance(m, JECL) and m.seed == 5 and m.config.lam == 0.3


def test_wrap_hook_is_used(synth):
    data, _ = synth
    wrapped = []
    cfg = {**SMALL, "image_ae": {**SMALL_AE, "epochs": 2}, "text_ae": {**SMALL_AE, "epochs": 2},
           "cluster": {"batch_size": 64, "max_iter": 5}}
    JECL(K, cfg, seed=0, wrap=lambda m: wrapped.append(type(m).__name__) or m).fit(data)
    assert wrapped == ["AutoEncoder", "AutoEncoder", "TwoViewClusteringNet"]


class DistOps(GlobalOps):
    """A torch.distributed (gloo) GlobalOps, as a Ray Train worker would use."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(self, tensor):
        out = tensor.clone()
        self.dist.all_reduce(out)
        return out

    def all_gather_cat(self, tensor):
        n = torch.tensor([tensor.shape[0]])
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, n)
        m = int(max(sizes))
        pad = torch.zeros((m, *tensor.shape[1:]), dtype=tensor.dtype)
        pad[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(pad) for _ in range(self.world_size)]
        self.dist.all_gather(parts, pad)
        return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])

    def broadcast(self, tensor, src=0):
        out = tensor.clone()
        self.dist.broadcast(out, src)
        return out

    def barrier(self):
        self.dist.barrier()


def _ddp_worker(rank, world, port, out_dir, data, cfg):
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = np.arange(0, 100) if rank == 0 else np.arange(100, len(data))  # uneven shards
        m = JECL(K, cfg, seed=0, wrap=lambda mod: DDP(mod)).fit(data.subset(shard), DistOps())
        updates = sum(h["phase"] == "self_training" for h in m.history_)
        np.savez(f"{out_dir}/rank{rank}.npz", pred=m.predict(data), steps=m.n_iter_, updates=updates,
                 mu=m.net_.image.centroids.detach().numpy())
        # Teardown order: the DDP replicas (their reducers hold the group) go first, then both ranks meet, then
        # the group. Otherwise a rank could be aborted at exit ("terminate called without an active exception",
        # seen once in CI).
        del m
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_jecl_data_parallel_ddp(synth, tmp_path):
    """Two gloo processes, DDP-wrapped nets, uneven shards with missing captions: every
    collective is matched (no deadlock), both workers end with the same model and the result
    clusters the whole data set."""
    import socket

    import torch.multiprocessing as mp

    data, y = synth
    data = drop_captions(data, 0.3, seed=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = {**SMALL, "image_ae": {**SMALL_AE, "epochs": 10}, "text_ae": {**SMALL_AE, "epochs": 10},
           "cluster": {"batch_size": 64, "max_iter": 120}}
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), data, cfg), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert int(r0["steps"]) == int(r1["steps"]) and int(r0["updates"]) == int(r1["updates"])
    np.testing.assert_allclose(r0["mu"], r1["mu"], atol=1e-5)  # DDP kept the replicas identical
    assert (r0["pred"] == r1["pred"]).all()
    assert nmi(y, r0["pred"]) > 0.8
