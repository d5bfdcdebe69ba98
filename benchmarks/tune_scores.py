"""Which label-free score ranks a sweep's trials like NMI does? (the measurement behind ``tune.score``)

Fits ``--trials`` configurations drawn at random from an algorithm's search space (raymmc.train.tune_space,
the space `raymmc tune` searches) in-process on a run's cached features, and prints for each trial every
label-free score of raymmc.cluster.selection beside NMI, then Spearman(score, NMI) per score.

    python benchmarks/tune_scores.py --features runs/<run> --trials 16 --clusters 11
    python benchmarks/tune_scores.py --features runs/<run> --trials 16 --clusters 6:16   # K searched too
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.registry import make_clusterer  # noqa: E402
from raymmc.cluster.selection import agreement, label_free_scores  # noqa: E402
from raymmc.report.metrics import evaluate  # noqa: E402
from raymmc.train import tune_space  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, help="a `raymmc run` directory (its cached features)")
    ap.add_argument("--algorithm", default="jecl")
    ap.add_argument("--clusters", default=None, help="K or LO:HI (default: the number of labels)")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stability", action="store_true", help="also fit each trial with seed+1 (twice the time)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from raymmc.pipeline import load_run_features

    data, truth = load_run_features(args.features)
    n_labels = len(set(truth.tolist()))
    lo, hi = tune_space.parse_clusters(args.clusters or str(n_labels))
    space = tune_space.space(args.algorithm, {})
    rng = np.random.default_rng(args.seed)
    rows = []
    for t in range(args.trials):
        params = tune_space.draw(space, rng)
        k = int(rng.integers(lo, hi + 1)) if hi > lo else lo
        start = time.perf_counter()
        cfg = tune_space.to_params(args.algorithm, params, {})
        model = make_clusterer(args.algorithm, k, cfg, seed=args.seed).fit(data)
        labels = model.labels_
        row = {"trial": t, "clusters": k, **params, **label_free_scores(model, data, labels, seed=args.seed)}
        if args.stability:
            other = make_clusterer(args.algorithm, k, cfg, seed=args.seed + 1).fit(data)
            keep = (labels >= 0) & (other.labels_ >= 0)
            row["stability"] = agreement(labels[keep], other.labels_[keep])
        keep = labels >= 0
        row.update({k2: v for k2, v in evaluate(truth[keep], labels[keep]).items() if k2 in ("nmi", "acc", "ari")})
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
    from scipy.stats import spearmanr

    nmi = np.array([r["nmi"] for r in rows])
    print(f"\n{args.features}: {len(rows)} {args.algorithm} trials, NMI {nmi.min():.3f}..{nmi.max():.3f}")
    for name in ("silhouette", "calinski_harabasz", "agreement", "silhouette_agreement", "agreed_silhouette",
                 "stability"):
        vals = np.array([r.get(name, np.nan) for r in rows], dtype=float)
        if np.isfinite(vals).sum() >= 3:
            ok = np.isfinite(vals)
            rho = spearmanr(vals[ok], nmi[ok]).statistic
            best = int(np.nanargmax(vals))
            rank = int((nmi > nmi[best]).sum()) + 1
            print(f"  {name:18s} Spearman {rho:+.3f}; its pick: NMI {nmi[best]:.3f} (rank {rank} of {len(rows)}), "
                  f"K={rows[best]['clusters']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
