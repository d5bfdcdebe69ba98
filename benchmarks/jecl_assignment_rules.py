"""Is JECL's final assignment rule what limits it? (issue 13, an experiment: JECL's lead on stamps-icons)

Fits JECL (today's defaults, or ``--config`` overrides) once per seed, on complete features and with half the
captions removed (the seeded protocol of benchmarks/quality.py), and reads four partitions off each fit:

* ``mix``: argmax of lam q + (1 - lam) r (the product's rule; q alone without a caption);
* ``mix50``: the same with lam = .5;
* ``logmix``: argmax of lam log q + (1 - lam) log r (a geometric mixture);
* ``kmeans-embed``: k-means (10 restarts) on the latents [z, v], each block scaled to unit mean norm.

Prints the NMI of each, mean ± std over the seeds. No rule sees the labels.

    python benchmarks/jecl_assignment_rules.py --features <tuxpaint run> --features <oxygen run> \
        --features <stamps run> --seeds 5 --jobs 2
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

RULES = ("mix", "mix50", "logmix", "kmeans-embed")


def rules(q: np.ndarray, r: np.ndarray, emb: np.ndarray, hi: np.ndarray, ht: np.ndarray, lam: float,
          latent: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """Each rule's hard assignment from one fit's view assignments ``q``/``r`` and latents ``emb`` = [z, v]."""
    import torch
    from sklearn.cluster import KMeans

    from raymmc.cluster.jecl import combine

    def mixed(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:  # JECL's own mixing, at weight w
        return combine(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(hi), torch.from_numpy(ht),
                       w).argmax(1).numpy()

    eps = 1e-12
    z, v = emb[:, :latent], emb[:, latent:]
    sz, sv = np.linalg.norm(z[hi], axis=1).mean() or 1.0, np.linalg.norm(v[ht], axis=1).mean() or 1.0
    return {"mix": mixed(q, r, lam), "mix50": mixed(q, r, 0.5),
            "logmix": mixed(np.log(q + eps), np.log(r + eps), lam),
            "kmeans-embed": KMeans(k, n_init=10, random_state=seed).fit_predict(np.concatenate([z / sz, v / sv], 1))}


def fit(task: tuple) -> tuple[str, bool, int, dict[str, float]]:
    """One seed's fit (one torch thread) and the NMI of each rule."""
    features, config, missing, seed = task
    import torch

    from raymmc.cluster.protocols import drop_captions
    from raymmc.cluster.registry import make_clusterer
    from raymmc.report.metrics import evaluate

    torch.set_num_threads(1)
    data, labels = load(features)
    k = len(np.unique(labels))
    d = drop_captions(data, 0.5, seed=seed) if missing else data
    est = make_clusterer("jecl", k, config, seed=seed).fit(d)
    q, r = est.view_assignments(d)
    parts = rules(q, r, est.embed(d), np.asarray(d.has_image, bool), np.asarray(d.has_text, bool),
                  est.config.lam, est.config.image_ae.latent, k, seed)
    return features, missing, seed, {name: evaluate(labels, p)["nmi"] for name, p in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", action="append", required=True, help="a `raymmc run` directory or an .npz")
    ap.add_argument("--config", default="{}", help="JSON overrides of JECL's config")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    tasks = [(f, json.loads(args.config), m, s) for f in args.features for m in (False, True)
             for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as ex:
        results = list(ex.map(fit, tasks))
    for f in args.features:
        for m in (False, True):
            got = [res for ff, mm, _, res in results if ff == f and mm == m]
            cells = "  ".join(f"{r} {np.mean([g[r] for g in got]):.3f}±{np.std([g[r] for g in got]):.3f}"
                              for r in RULES)
            print(f"{f} {'50% missing' if m else 'complete'}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
