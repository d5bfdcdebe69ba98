"""Distributed k-means (raymmc's Lloyd over data-parallel workers) against single-process FAISS.

    .venv/bin/python benchmarks/kmeans_distributed.py [--n 1000000] [--d 64] [--k 100] [--workers 2] [--seeds 3]

The same n x d points (a seeded mixture of k Gaussians, L2-normalised, since raymmc's k-means clusters
L2-normalised views) are clustered by:
- FAISS: ``faiss.Kmeans`` in this process (random initialisation, ``niter`` iterations, one run), as shipped
  (it trains on at most 256 points per centroid, a subsample) and on every point (``max_points_per_centroid``
  raised: the like-for-like reference);
- raymmc, 1 worker: ``KMeans`` in-process (k-means++ on a 200k keyed sample, then Lloyd on every row);
- raymmc, N workers: the same estimator in N processes of a real gloo process group (what a Ray Train worker
  group runs), each holding only its 1/N of the rows; only K x d sums and counts cross between them.
For each: the k-means objective (sum of squared distances of every point to its nearest centroid, computed the
same way for all, by FAISS's exact search) and the wall time of the fit, mean ± std over seeds; then the
objective ratio to FAISS (target: within 1%) and NMI between the 1-worker and N-worker assignments.
Quiet machine: run it alone.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import numpy as np

NITER = 100


def points(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    x = centers[rng.integers(0, k, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def objective(x: np.ndarray, centers: np.ndarray) -> tuple[float, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centers, dtype=np.float32))
    dist, labels = index.search(x, 1)
    return float(np.maximum(dist[:, 0], 0).astype(np.float64).sum()), labels[:, 0]


def raymmc_fit(x: np.ndarray, ids: np.ndarray, k: int, seed: int, ops=None) -> tuple[np.ndarray, float]:
    from raymmc.cluster.base import LOCAL, MultiViewData
    from raymmc.cluster.registry import make_clusterer

    model = make_clusterer("kmeans", k, {"view": "image", "niter": NITER, "nredo": 1}, seed=seed)
    data = MultiViewData(image=x, has_image=np.ones(len(x), bool), ids=ids)
    t0 = time.perf_counter()
    model.fit(data, ops or LOCAL)
    return model.cluster_centers_, time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, out: str, n: int, d: int, k: int, seed: int) -> None:
    import torch
    import torch.distributed as dist

    from raymmc.train.ops import TorchDistributedOps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = points(n, d, k)
        rows = np.array_split(np.arange(n), world)[rank]
        ids = np.array([f"p{i}" for i in rows], dtype=object)
        centers, wall = raymmc_fit(np.ascontiguousarray(x[rows]), ids, k, seed, TorchDistributedOps())
        np.savez(os.path.join(out, f"rank{rank}.npz"), centers=centers, wall=wall)
    finally:
        dist.destroy_process_group()


def distributed(n: int, d: int, k: int, seed: int, workers: int) -> tuple[np.ndarray, float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(workers, port, out, n, d, k, seed), nprocs=workers, join=True)
        parts = [np.load(os.path.join(out, f"rank{r}.npz")) for r in range(workers)]
    return parts[0]["centers"], max(float(p["wall"]) for p in parts)


def main() -> None:
    import faiss
    import torch
    from sklearn.metrics import normalized_mutual_info_score

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # one core per fit, as each of the N workers gets
    x = points(a.n, a.d, a.k)
    ids = np.array([f"p{i}" for i in range(a.n)], dtype=object)
    rows: dict[str, list[tuple[float, float]]] = {"faiss": [], "faiss-default": [], "raymmc-1": [],
                                                  f"raymmc-{a.workers}": []}
    agreement = []
    for seed in range(a.seeds):
        for name, per_centroid in (("faiss", a.n), ("faiss-default", None)):
            t0 = time.perf_counter()
            km = faiss.Kmeans(a.d, a.k, niter=NITER, nredo=1, seed=seed + 1234,
                              **({"max_points_per_centroid": per_centroid} if per_centroid else {}))
            km.train(x)
            rows[name].append((objective(x, km.centroids)[0], time.perf_counter() - t0))
        c1, w1 = raymmc_fit(x, ids, a.k, seed)
        obj1, lab1 = objective(x, c1)
        rows["raymmc-1"].append((obj1, w1))
        cn, wn = distributed(a.n, a.d, a.k, seed, a.workers)
        objn, labn = objective(x, cn)
        rows[f"raymmc-{a.workers}"].append((objn, wn))
        agreement.append(normalized_mutual_info_score(lab1, labn))
        print(f"seed {seed}: faiss {rows['faiss'][-1][0]:.1f} ({rows['faiss'][-1][1]:.1f} s), raymmc-1 {obj1:.1f} "
              f"({w1:.1f} s), raymmc-{a.workers} {objn:.1f} ({wn:.1f} s), NMI(1 vs {a.workers}) {agreement[-1]:.4f}",
              flush=True)
    ref = np.mean([o for o, _ in rows["faiss"]])
    print(f"\n{a.n:,} x {a.d} points, k={a.k}, {NITER} iterations, {a.seeds} seeds (mean ± std); one thread a fit/worker")
    print("| fit | objective | / FAISS | wall s |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        obj, wall = np.array([o for o, _ in vals]), np.array([w for _, w in vals])
        print(f"| {name} | {obj.mean():.1f} ± {obj.std():.1f} | {obj.mean() / ref:.4f} | {wall.mean():.1f} ± {wall.std():.1f} |")
    print(f"NMI between raymmc's 1-worker and {a.workers}-worker assignments: {np.mean(agreement):.4f} ± "
          f"{np.std(agreement):.4f}")


if __name__ == "__main__":
    main()
