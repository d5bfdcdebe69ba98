"""Does a consensus of several fits beat one fit? (issue 13, an experiment: JECL's lead on stamps-icons)

Fits a method for seeds 0..N-1 on a run's features, then, for disjoint groups of R consecutive seeds, clusters
the group's assignments side by side (each fit's one-hot assignment, or its soft assignment, scaled by
1/sqrt(R)) with k-means (K clusters, 10 restarts): the usual "meta-clustering" consensus, which scales like
k-means (R*K dimensions per item), unlike a co-association matrix. Prints the NMI of the single fits and of the
consensus partitions, mean ± std over the groups. No fit and no consensus sees the labels.

    python benchmarks/consensus.py --features runs/<stamps run> --seeds 15 --jobs 2 --algorithm jecl
    python benchmarks/consensus.py --features runs/<stamps run> --seeds 15 --jobs 2 --algorithm kmeans \
        --config '{"view": "concat"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_any as load  # noqa: E402  (a run directory or an .npz; it puts the repo on sys.path)


def fit(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One seed's hard and soft assignment (one-hot where the method has no soft one), one torch thread."""
    features, algorithm, config, k, seed = task
    import torch

    from raymmc.cluster.registry import make_clusterer

    torch.set_num_threads(1)
    data, _ = load(features)
    est = make_clusterer(algorithm, k, config, seed=seed).fit(data)
    pred = np.asarray(est.predict(data))
    soft = est.soft_assign(data) if hasattr(est, "soft_assign") else np.eye(k)[pred]
    return pred, np.asarray(soft, dtype=np.float64)


def consensus(softs: list[np.ndarray], k: int, seed: int, hard: bool) -> np.ndarray:
    from sklearn.cluster import KMeans

    x = np.concatenate([np.eye(k)[s.argmax(1)] if hard else s for s in softs], axis=1) / np.sqrt(len(softs))
    return KMeans(k, n_init=10, random_state=seed).fit_predict(x)


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, help="a `raymmc run` directory or an .npz of features")
    ap.add_argument("--algorithm", default="jecl")
    ap.add_argument("--config", default="{}", help="JSON overrides of the algorithm's config")
    ap.add_argument("--seeds", type=int, default=15)
    ap.add_argument("--groups", type=int, nargs="*", default=[3, 5], help="consensus group sizes R")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    _, labels = load(args.features)
    k = len(np.unique(labels))
    tasks = [(args.features, args.algorithm, json.loads(args.config), k, s) for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as ex:
        fits = list(ex.map(fit, tasks))
    single = [nmi(labels, p) for p, _ in fits]
    print(f"{args.features} {args.algorithm}: single fit NMI {np.mean(single):.3f} ± {np.std(single):.3f} "
          f"({args.seeds} seeds)")
    for r in args.groups:
        groups = [list(range(i, i + r)) for i in range(0, args.seeds - r + 1, r)]
        for hard in (True, False):
            s = [nmi(labels, consensus([fits[j][1] for j in g], k, g[0], hard)) for g in groups]
            print(f"  consensus of {r} ({'one-hot' if hard else 'soft'}): NMI {np.mean(s):.3f} ± {np.std(s):.3f} "
                  f"over {len(groups)} disjoint groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
