"""How much can any mixed-modal method gain over concatenated k-means? (issue 13, DM2C's ceiling)

In the mixed-modal protocol every item keeps its image or its caption, never both, so a method that puts
both modalities into K shared clusters must *align* them: decide which image cluster a caption cluster is.
This benchmark clusters each modality on its own (k-means, K = the number of classes, on the items that
have that modality) and merges the two clusterings under several matchings of caption clusters to image
clusters:

* ``oracle``: the matching that pairs clusters with the most similar class profiles (uses the labels): the
  ceiling of every "per-modality clusters, then match" method with k-means-quality clusters;
* ``structure``: a label-free matching from the only cross-modal information mixed-modal data has, the
  geometry: the permutation that best aligns the two modalities' centroid-distance matrices (a quadratic
  assignment, scipy's FAQ, best of ``--restarts`` random starts);
* ``random``: the mean over 20 random permutations (what an alignment at chance gives);
* ``unmatched``: no matching at all, 2K cluster ids (concatenated k-means with zeros for the missing view
  does nearly this: its centroids fall in one modality's block or the other's, so it splits K between them).

beside k-means on the concatenated zero-filled features (the baseline DM2C is measured against). It also
prints, as a diagnostic that uses the labels, the Spearman correlation between the class-centroid distance
matrices of the two modalities: how much shared geometry there is to align by.

    python benchmarks/mixed_modal_ceiling.py --features runs/<tuxpaint run> --features runs/<oxygen run> \
        --features runs/<stamps run> --seeds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.protocols import mixed_modal  # noqa: E402
from raymmc.cluster.registry import make_clusterer  # noqa: E402
from raymmc.cluster.views import l2_normalize  # noqa: E402

MATCHINGS = ("concat", "unmatched", "oracle", "structure", "random")


def distances(centers: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((centers[:, None] - centers[None]) ** 2).sum(-1), 0.0))


def class_profiles(labels: np.ndarray, classes: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    p = np.zeros((k, n_classes))
    np.add.at(p, (labels, classes), 1)
    return p / p.sum(1, keepdims=True).clip(1)


def structure_match(text_centers: np.ndarray, image_centers: np.ndarray, restarts: int, seed: int) -> np.ndarray:
    """The permutation m (caption cluster j -> image cluster m[j]) that best aligns the centroid-distance
    matrices: maximise sum_jl D_t[j, l] * D_i[m[j], m[l]] (FAQ, best of ``restarts`` random starts)."""
    from scipy.optimize import quadratic_assignment

    a, b = distances(text_centers), distances(image_centers)
    best = None
    for r in range(restarts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = quadratic_assignment(a, b, method="faq", options={"maximize": True, "P0": "randomized",
                                                                     "rng": np.random.default_rng(seed * 1000 + r)})
        if best is None or res.fun > best.fun:
            best = res
    return best.col_ind


def one_seed(data, y: np.ndarray, k: int, seed: int, restarts: int) -> dict[str, float]:
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import normalized_mutual_info_score as nmi

    d = mixed_modal(data, seed=seed)
    img = np.flatnonzero(np.asarray(d.has_image, bool) & ~np.asarray(d.has_text, bool))
    txt = np.flatnonzero(~(np.asarray(d.has_image, bool) & ~np.asarray(d.has_text, bool)))
    out = {"concat": nmi(y, make_clusterer("kmeans", k, {"view": "concat"}, seed=seed).fit(d).predict(d))}
    li = make_clusterer("kmeans", k, {"view": "image"}, seed=seed).fit(d.subset(img)).labels_
    lt = make_clusterer("kmeans", k, {"view": "text"}, seed=seed).fit(d.subset(txt)).labels_

    def merged(match: np.ndarray) -> float:
        pred = np.empty(len(y), int)
        pred[img], pred[txt] = li, match[lt]
        return float(nmi(y, pred))

    out["unmatched"] = merged(np.arange(k) + k)
    n_classes = int(y.max()) + 1
    rows, cols = linear_sum_assignment(-(class_profiles(lt, y[txt], k, n_classes)
                                         @ class_profiles(li, y[img], k, n_classes).T))
    oracle = np.empty(k, int)
    oracle[rows] = cols
    out["oracle"] = merged(oracle)
    xi, xt = l2_normalize(np.asarray(data.image[img], np.float32)), l2_normalize(np.asarray(data.text[txt], np.float32))
    ci = np.stack([xi[li == j].mean(0) for j in range(k)])
    ct = np.stack([xt[lt == j].mean(0) for j in range(k)])
    out["structure"] = merged(structure_match(ct, ci, restarts, seed))
    rng = np.random.default_rng(seed)
    out["random"] = float(np.mean([merged(rng.permutation(k)) for _ in range(20)]))
    return out


def shared_geometry(data, y: np.ndarray) -> float:
    """Spearman between the class-centroid distance matrices of the two modalities (all items; uses labels)."""
    from scipy.stats import spearmanr

    n = int(y.max()) + 1
    xi, xt = l2_normalize(np.asarray(data.image, np.float32)), l2_normalize(np.asarray(data.text, np.float32))
    di = distances(np.stack([xi[y == c].mean(0) for c in range(n)]))
    dt = distances(np.stack([xt[y == c].mean(0) for c in range(n)]))
    iu = np.triu_indices(n, 1)
    return float(spearmanr(di[iu], dt[iu]).statistic)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", action="append", required=True, help="a `raymmc run` directory (repeatable)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from raymmc.pipeline import load_run_features

    torch.set_num_threads(1)
    results = {}
    print("| features | K | class geometry shared (Spearman) | " + " | ".join(MATCHINGS)
          + " | alignment needed to beat concat |")
    print("|---|---|---|" + "---|" * len(MATCHINGS) + "---|")
    for path in args.features:
        data, labels = load_run_features(path)
        y = np.unique(labels, return_inverse=True)[1]
        k = int(y.max()) + 1
        runs = [one_seed(data, y, k, s, args.restarts) for s in range(args.seeds)]
        stats = {m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs]))) for m in MATCHINGS}
        # where concat k-means lies between a chance alignment (0) and a perfect one (1)
        needed = (stats["concat"][0] - stats["random"][0]) / max(1e-9, stats["oracle"][0] - stats["random"][0])
        geometry = shared_geometry(data, y)
        results[path] = {"k": k, "shared_geometry": geometry, "needed": needed, "seeds": runs,
                         **{m: {"mean": s[0], "std": s[1]} for m, s in stats.items()}}
        cells = " | ".join(f"{stats[m][0]:.3f}±{stats[m][1]:.3f}" for m in MATCHINGS)
        print(f"| {path} | {k} | {geometry:.2f} | {cells} | {needed:.0%} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
