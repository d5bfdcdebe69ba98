"""How far 1 process and 2 data-parallel (gloo, DDP) processes part on a run's real features: the same seed,
the same keyed batches, only the floating-point summation order differs (docs/results.md, "JECL with 1 and N
workers on real features").

    python benchmarks/workers_agreement.py --features runs/<run> --clusters 21 --split half --threads 1
    python benchmarks/workers_agreement.py --features runs/<run> --clusters 21 --max-iter 1   # after the start
    python benchmarks/workers_agreement.py --features runs/<run> --clusters 21 --threads 2 --precision float64

Prints NMI between the two fits' assignments, items that moved (label ids compared as they are), the step
counts and each fit's NMI against the labels.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import normalized_mutual_info_score as nmi


def _fit(args, data, ops=None, wrap=None):
    from raymmc.cluster.base import LOCAL
    from raymmc.cluster.registry import make_clusterer

    ae = {"epochs": args.ae_epochs}
    views = {"image_ae": ae, "text_ae": ae} if args.algorithm == "jecl" else {"ae": ae, "view": args.view}
    cfg = {**views, "cluster": {"max_iter": args.max_iter}, "device": "cpu", "precision": args.precision}
    return make_clusterer(args.algorithm, args.clusters, cfg, seed=args.seed, wrap=wrap).fit(data, ops or LOCAL)


def _shard(n: int, rank: int, world: int, split: str) -> np.ndarray:
    if split == "interleave":
        return np.arange(n)[rank::world]
    if split == "half":
        return np.array_split(np.arange(n), world)[rank]
    return np.flatnonzero(np.random.default_rng(int(split)).integers(0, world, n) == rank)  # a seeded random split


def _worker(rank: int, world: int, init: str, args, out) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from raymmc.pipeline import load_run_features
    from raymmc.train.ops import TorchDistributedOps

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        data, _ = load_run_features(args.features)
        model = _fit(args, data.subset(_shard(len(data), rank, world, args.split)), TorchDistributedOps(),
                     DistributedDataParallel)
        out[rank] = (model.predict(data).tolist(), model.n_iter_)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="a raymmc run directory (its cached features and labels)")
    p.add_argument("--algorithm", default="jecl", choices=["jecl", "dec"])
    p.add_argument("--clusters", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-epochs", type=int, default=30)
    p.add_argument("--max-iter", type=int, default=600)
    p.add_argument("--split", default="half", help="interleave, half, or an integer seed of a random split")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each of the 2 processes")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--view", default="concat", choices=["image", "text", "concat"], help="DEC's view")
    args = p.parse_args()

    from raymmc.pipeline import load_run_features

    torch.set_num_threads(1)
    data, labels = load_run_features(args.features)
    one = _fit(args, data)
    l1 = one.predict(data)
    with tempfile.TemporaryDirectory() as tmp, mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        procs = [mp.get_context("spawn").Process(target=_worker, args=(r, 2, os.path.join(tmp, "init"), args, out))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        l2, n2 = out[0]
    l2 = np.asarray(l2)
    print(json.dumps({"algorithm": args.algorithm, "precision": args.precision, "split": args.split,
                      "threads": args.threads,
                      "nmi_1_vs_2": round(float(nmi(l1, l2)), 4), "items_moved": int((l1 != l2).sum()),
                      "n_iter": [int(one.n_iter_), int(n2)],
                      "nmi_vs_labels": [round(float(nmi(labels, l1)), 4), round(float(nmi(labels, l2)), 4)]}))


if __name__ == "__main__":
    main()
