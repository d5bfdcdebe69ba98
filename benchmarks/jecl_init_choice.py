"""Can a sweep's label-free score tell which JECL start suits an archive? (issue 13)

Fits JECL with ``init_mode`` ``joint`` (the default), ``per_view`` (the paper's) and ``input`` (from
concatenated k-means's partition) on each archive, several seeds each, and prints the label-free scores a
sweep would rank them by (raymmc.cluster.selection) beside their NMI against the labels (read only for this table).

    python benchmarks/jecl_init_choice.py --features runs/<tuxpaint run> --features runs/<oxygen run> \\
        --features runs/<stamps run> --seeds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_any  # noqa: E402

from raymmc.cluster.registry import make_clusterer  # noqa: E402
from raymmc.cluster.selection import label_free_scores  # noqa: E402

SHOWN = ("silhouette", "agreement", "agreed_silhouette", "silhouette_agreement", "nmi")


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import normalized_mutual_info_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", action="append", required=True, help="a `raymmc run` directory (repeatable)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--inits", nargs="+", default=["joint", "per_view", "input"])
    args = ap.parse_args(argv)
    print("| archive | init_mode | " + " | ".join(SHOWN) + " |")
    print("|---" * (2 + len(SHOWN)) + "|")
    for path in args.features:
        data, labels = load_any(path)
        k = len(np.unique(labels))
        for init in args.inits:
            rows = []
            for seed in range(args.seeds):
                model = make_clusterer("jecl", k, {"init_mode": init}, seed=seed).fit(data)
                pred = model.predict(data)
                rows.append({**label_free_scores(model, data, pred, seed=0),
                             "nmi": float(normalized_mutual_info_score(labels, pred))})
            cells = [f"{np.mean([r[c] for r in rows]):.4f}±{np.std([r[c] for r in rows]):.4f}" for c in SHOWN]
            print(f"| {Path(path).name} | {init} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
