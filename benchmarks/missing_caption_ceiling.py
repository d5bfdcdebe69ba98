"""How much NMI must any method lose when half the captions are missing? (issue 13, JECL's < 10% target)

An item without a caption can only be placed by its image. This benchmark builds an optimistic reference for
every method that does so: it fits JECL on the *complete* archive (captions for all), then removes half the
captions (the same seeded protocol as benchmarks/quality.py) and

* keeps the complete fit's cluster for every item that kept its caption (as if losing the other captions cost
  those items nothing), and
* places every caption-less item by a *supervised* image classifier (logistic regression, and k nearest
  neighbours; the better of the two) trained on the captioned items' image features to predict the complete
  fit's clusters: the best a learnt map from image features to those clusters does here.

Its NMI against the labels, relative to the complete fit's, is the loss that remains even with a perfect
captioned half and a supervised image-to-cluster map; no method that sees only the image of a caption-less item
and learns its map from the captioned ones (JECL's image branch does exactly this, without supervision) can be
expected to lose less. The NMI of the caption-less half is printed beside the captioned half's.

    python benchmarks/missing_caption_ceiling.py --features runs/<tuxpaint run> --features runs/<oxygen run> \
        --features runs/<stamps run> --seeds 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.protocols import drop_captions  # noqa: E402
from raymmc.cluster.registry import make_clusterer  # noqa: E402
from raymmc.cluster.views import l2_normalize  # noqa: E402


def one_seed(data, y: np.ndarray, k: int, seed: int, fraction: float) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import normalized_mutual_info_score as nmi
    from sklearn.neighbors import KNeighborsClassifier

    full = make_clusterer("jecl", k, {}, seed=seed).fit(data).labels_
    kept = np.asarray(drop_captions(data, fraction, seed=seed).has_text, bool)
    lost = ~kept
    x = l2_normalize(np.asarray(data.image, np.float32))
    out = {"complete": float(nmi(y, full))}
    best = None
    for name, probe in (("logistic", LogisticRegression(max_iter=2000, C=1.0)),
                        ("knn", KNeighborsClassifier(n_neighbors=10, weights="distance"))):
        pred = full.copy()
        pred[lost] = probe.fit(x[kept], full[kept]).predict(x[lost])
        score = float(nmi(y, pred))
        out[f"ceiling_{name}"] = score
        # how often the image alone recovers the complete fit's cluster of a caption-less item
        out[f"agreement_{name}"] = float((pred[lost] == full[lost]).mean())
        if best is None or score > best[0]:
            best = (score, pred)
    out["ceiling"] = best[0]
    out["ceiling_captioned"] = float(nmi(y[kept], best[1][kept]))
    out["ceiling_captionless"] = float(nmi(y[lost], best[1][lost]))
    out["loss"] = 1.0 - out["ceiling"] / out["complete"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", action="append", required=True, help="a `raymmc run` directory (repeatable)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.5, help="share of captions removed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from raymmc.pipeline import load_run_features

    torch.set_num_threads(1)
    keys = ("complete", "ceiling", "loss", "ceiling_captioned", "ceiling_captionless", "ceiling_logistic",
            "ceiling_knn", "agreement_logistic", "agreement_knn")
    print("| features | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    results = {}
    for path in args.features:
        data, labels = load_run_features(path)
        y = np.unique(labels, return_inverse=True)[1]
        runs = [one_seed(data, y, int(y.max()) + 1, s, args.fraction) for s in range(args.seeds)]
        results[path] = runs
        cells = " | ".join(f"{np.mean([r[key] for r in runs]):.3f}±{np.std([r[key] for r in runs]):.3f}"
                           for key in keys)
        print(f"| {path} | {cells} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
