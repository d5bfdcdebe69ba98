"""Data-parallel k-means (raymmc.cluster.lloyd) and its calibrated confidences (raymmc.cluster.calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from raymmc.cluster.base import LOCAL, MultiViewData
from raymmc.cluster.calibration import discriminant_variance, gaussian_posterior
from raymmc.cluster.kmeans import KMeans, soft_from_distances
from raymmc.cluster.lloyd import NearestSearch, lloyd, shard_sample
from raymmc.hashing import keyed_priority as sample_priority


def blobs(n: int, k: int, d: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters N(c_k, noise^2 I), centres of norm ~sqrt(d) (so ~sqrt(2d) apart), equal weights."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    return (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y, centers


def as_data(x: np.ndarray, ids: bool = True) -> MultiViewData:
    return MultiViewData(image=x, ids=np.array([f"item-{i}" for i in range(len(x))], dtype=object) if ids else None)


RAW = {"view": "image"}  # k-means on the image view, L2-normalised by view_matrix


def test_discriminant_variance_is_the_spread_along_the_centroid_differences():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 30) * 5
    assert discriminant_variance(rng.normal(scale=0.5, size=(4000, 30)), centers) == pytest.approx(0.25, rel=0.05)
    # spread only where the centroids do not differ cannot make an item ambiguous
    off = np.zeros((4000, 30))
    off[:, 10:] = rng.normal(size=(4000, 20))
    assert discriminant_variance(off, centers) < 1e-9


def test_confidences_match_the_bayes_posterior_of_the_true_mixture():
    x, _, centers = blobs(3000, 3, 10, noise=1.5)
    truth = gaussian_posterior(((x[:, None, :] - centers[None]) ** 2).sum(-1), 1.5 ** 2)  # N(c_k, I), equal weights
    # Lloyd from the true centres keeps cluster k on centre k; the variance is measured, not given
    fit = lloyd(x, centers.astype(np.float32), LOCAL, max_iter=50, tol=0, search=NearestSearch(10, use_gpu=False))
    s2 = discriminant_variance(x - fit.centers[fit.labels], fit.centers)
    soft = gaussian_posterior(((x[:, None, :] - fit.centers[None]) ** 2).sum(-1), s2)
    # hard assignment trims the tails of each cluster, so s^2 is a little low; the Student-t kernel is far off
    assert np.abs(soft - truth).mean() < 0.05
    student = soft_from_distances(((x[:, None, :] - fit.centers[None]) ** 2).sum(-1))
    assert np.abs(student - truth).mean() > 4 * np.abs(soft - truth).mean()
    assert 0.3 < soft.max(1).mean() < 0.99  # neither 1/K for all nor certain for all


def test_kmeans_confidences_mean_something():
    x, y, _ = blobs(900, 5, 8, noise=0.4)
    km = KMeans(5, RAW, seed=0).fit(as_data(x))
    assert normalized_mutual_info_score(y, km.labels_) > 0.9
    conf = km.soft_assign(as_data(x)).max(1)
    assert conf.mean() > 0.6  # not ~1/K = 0.2, as the Student-t kernel on normalised features gave
    # items almost as near to a second centroid are less confident than the clear ones
    d = np.sort(((km.embed(as_data(x))[:, None] - km.cluster_centers_[None]) ** 2).sum(-1), 1)
    margin = d[:, 1] - d[:, 0]
    assert conf[margin < np.quantile(margin, 0.1)].mean() < conf[margin > np.quantile(margin, 0.9)].mean() - 0.15


def test_lloyd_equals_scikit_learns_lloyd_from_the_same_start():
    from sklearn.cluster import KMeans as SkKMeans

    x, _, _ = blobs(600, 4, 8, noise=1.0, seed=3)
    init = x[:4].copy()
    ours = lloyd(x, init, LOCAL, max_iter=300, tol=0, search=NearestSearch(8, use_gpu=False))
    sk = SkKMeans(4, init=init, n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(x.astype(np.float64))
    np.testing.assert_array_equal(ours.labels, sk.labels_)
    np.testing.assert_allclose(ours.centers, sk.cluster_centers_, atol=1e-4)
    assert ours.inertia == pytest.approx(sk.inertia_, rel=1e-4)


def test_the_sample_depends_on_the_items_not_their_order_or_sharding():
    ids = np.array([f"id{i}" for i in range(1000)], dtype=object)
    x = np.arange(1000, dtype=np.float32)[:, None]
    p = sample_priority(ids, 7)
    perm = np.random.default_rng(0).permutation(1000)
    a = shard_sample(x, p, 50, LOCAL)
    b = shard_sample(x[perm], sample_priority(ids[perm], 7), 50, LOCAL)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 50 and len(np.unique(a)) == 50
    assert not np.array_equal(a, shard_sample(x, sample_priority(ids, 8), 50, LOCAL))  # the seed matters


def test_outlier_rules_mark_far_and_ambiguous_items():
    x, _, _ = blobs(500, 3, 16, noise=0.3)
    x = np.vstack([x, np.ones((1, 16), np.float32)])  # a direction no blob has (rows are L2-normalised)
    km = KMeans(3, {"view": "image", "outliers": {"distance_quantile": 0.99}}, seed=0).fit(as_data(x))
    marks = km.outliers(as_data(x))
    assert marks[-1].startswith("outlier: farther") and (marks != "").mean() < 0.05
    assert (KMeans(3, RAW, seed=0).fit(as_data(x)).outliers(as_data(x)) == "").all()  # off by default
    both = KMeans(3, {"view": "image", "outliers": {"distance_quantile": 0.99, "min_confidence": 0.9}},
                  seed=0).fit(as_data(x))
    soft, why = both.assign(as_data(x))  # the prediction workers' one pass equals the two separate calls
    np.testing.assert_array_equal(soft, both.soft_assign(as_data(x)))
    np.testing.assert_array_equal(why, both.outliers(as_data(x)))


def test_state_round_trip_keeps_the_calibration():
    x, _, _ = blobs(300, 3, 8, noise=0.5)
    km = KMeans(3, RAW, seed=1).fit(as_data(x))
    back = KMeans(3)
    back.load_state_dict(km.state_dict())
    np.testing.assert_array_equal(back.soft_assign(as_data(x)), km.soft_assign(as_data(x)))
    old = {k: v for k, v in km.state_dict().items() if k != "calibration"}
    with pytest.raises(ValueError, match="fit it again"):
        KMeans(3).load_state_dict(old)


# ------------------------------------------------------------------------------------ 1 vs 2 workers
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from test_dec_jecl import DistOps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, _, _ = blobs(700, 6, 12, noise=1.0, seed=5)  # overlapping: the result depends on the start
        data = as_data(x)
        shard = np.arange(0, 330) if rank == 0 else np.arange(330, 700)  # uneven
        out = {}
        for sample in (100, 10_000):  # a sample smaller than the data (Lloyd matters) and all of it
            km = KMeans(6, {**RAW, "sample": sample, "nredo": 2}, seed=3).fit(data.subset(shard), DistOps())
            out[f"pred{sample}"] = km.predict(data)
            out[f"centers{sample}"] = km.cluster_centers_
            out[f"var{sample}"] = np.array([km.variance_, km.inertia_])
        np.savez(f"{out_dir}/rank{rank}.npz", **out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_one_and_two_workers_give_the_same_clustering(tmp_path):
    from conftest import spawn_workers

    r0, r1 = spawn_workers(_worker, tmp_path)
    x, _, _ = blobs(700, 6, 12, noise=1.0, seed=5)
    for sample in (100, 10_000):
        one = KMeans(6, {**RAW, "sample": sample, "nredo": 2}, seed=3).fit(as_data(x))
        np.testing.assert_array_equal(r0[f"pred{sample}"], r1[f"pred{sample}"])  # one model on both ranks
        np.testing.assert_allclose(r0[f"centers{sample}"], one.cluster_centers_, atol=1e-5)
        assert normalized_mutual_info_score(one.predict(as_data(x)), r0[f"pred{sample}"]) >= 0.99
        np.testing.assert_allclose(r0[f"var{sample}"], [one.variance_, one.inertia_], rtol=1e-5)
