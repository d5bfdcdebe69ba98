"""DM2C vs k-means on mixed-modal features, mean ± std over seeds.

    .venv/bin/python benchmarks/dm2c.py --data /work/feat/tuxpaint.npz --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/dm2c.py --data synthetic --seeds 0 1 2

Per seed s: the mixed-modal split (one modality per item, 50/50) is drawn with seed s, and every
method runs with seed s. Methods:

* ``kmeans-concat``: each item's available view L2-normalised, zeros for the missing one, concatenated.
* ``kmeans-stacked-pca``: the paper's k-means protocol: each modality PCA'd (centred, L2-normalised
  rows) to the same 128 dimensions and the rows stacked in one matrix, no alignment.
* ``kmeans-permodal-oracle``: k-means with K clusters on the image items and, separately, on the text
  items; each modality's clusters are mapped to classes with its OWN Hungarian matching (labels used to
  align the two modalities' clusters): an upper reference no unsupervised method can be fairly held to.
* ``dm2c``: the model (config from flags); ``dm2c(img|txt items)`` = its ACC restricted to one modality.
* ``dm2c-no-uni``: DM2C's own latents without the cross-modal mapping (the paper's ablation).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score as nmi_score

from raymmc.cluster.assignment import linear_assignment
from raymmc.cluster.base import MultiViewData
from raymmc.cluster.dm2c import DM2C, DM2CConfig
from raymmc.cluster.protocols import mixed_modal
from raymmc.cluster.kmeans import kmeans
from raymmc.cluster.views import l2_normalize, view_matrix


def acc_score(y: np.ndarray, pred: np.ndarray) -> float:
    yc = np.unique(y, return_inverse=True)[1]
    pc = np.unique(pred, return_inverse=True)[1]
    c = np.zeros((pc.max() + 1, yc.max() + 1))
    np.add.at(c, (pc, yc), 1)
    r, k = linear_assignment(c, maximize=True)
    return float(c[r, k].sum() / len(y))


def load(path: str) -> tuple[MultiViewData, np.ndarray]:
    if path == "synthetic":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(123)
        x = (x / 16.0).astype(np.float32)
        w1 = rng.normal(size=(64, 96)) / 8
        w2 = rng.normal(size=(96, 48)) / 10
        t = np.tanh(x @ w1) @ w2 + 0.05 * rng.normal(size=(len(x), 48))
        return MultiViewData(image=x, text=t.astype(np.float32)), y
    if not path.endswith(".npz"):  # a `raymmc run` directory: its cached features
        from raymmc.pipeline import load_run_features

        data, labels = load_run_features(path)
        return MultiViewData(image=data.image, text=data.text), labels
    z = np.load(path, allow_pickle=False)  # never unpickle what was read from storage
    return MultiViewData(image=z["image"].astype(np.float32), text=z["text"].astype(np.float32)), z["labels"]


def scores(y, pred):
    return {"acc": acc_score(y, pred), "nmi": float(nmi_score(y, pred))}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    full, y = load(args.data)
    k = len(np.unique(y))
    cfg_over = json.loads(args.config) if args.config else {}
    res: dict[str, list[dict]] = {}
    for s in args.seeds:
        d = mixed_modal(full, seed=s)
        hi, ht = d.has_image, d.has_text
        _, lab, _ = kmeans(view_matrix(d, "concat")[0], k, seed=s)
        res.setdefault("kmeans-concat", []).append(scores(y, lab))
        # the paper's k-means protocol: each modality PCA'd to the same dimension, rows stacked
        zs = np.zeros((len(y), 128), np.float32)
        for mask, x in ((hi, d.image), (ht, d.text)):
            xm = l2_normalize(x[mask])
            xm = xm - xm.mean(0)
            u, sv, _ = np.linalg.svd(xm, full_matrices=False)
            r = min(128, len(sv))
            zs[mask, :r] = l2_normalize(u[:, :r] * sv[:r])
        _, lab, _ = kmeans(zs, k, seed=s)
        res.setdefault("kmeans-stacked-pca", []).append(scores(y, lab))
        _, li, _ = kmeans(l2_normalize(d.image[hi]), k, seed=s)
        _, lt, _ = kmeans(l2_normalize(d.text[ht]), k, seed=s)
        res.setdefault("kmeans-permodal-oracle", []).append(scores(y, _oracle(y, hi, li, lt)))
        t0 = time.time()
        m = DM2C(k, DM2CConfig(**cfg_over), seed=s)
        m.fit(d)
        pred = m.predict(d)
        sc = scores(y, pred)
        sc.update({"acc_img_items": acc_score(y[hi], pred[hi]), "acc_txt_items": acc_score(y[ht], pred[ht]),
                   "xmodal_1nn": _xmodal_1nn(m.embed(d), y, m.target_ == "image", hi, ht),
                   "target": m.target_, "sil": m.silhouette_, "secs": time.time() - t0})
        res.setdefault("dm2c", []).append(sc)
        # ablation: no unification (both latents k-means'd as if one space)
        with torch.no_grad():
            zi = m._latents(torch.from_numpy(m._prep(d.image[hi])), "image").numpy()
            zt = m._latents(torch.from_numpy(m._prep(d.text[ht])), "text").numpy()
        z = np.zeros((len(y), zi.shape[1]), np.float32)
        z[hi], z[ht] = zi, zt
        _, lab, _ = kmeans(z, k, seed=s)
        res.setdefault("dm2c-no-uni", []).append(scores(y, lab))
        print(s, {kk: v[-1] for kk, v in res.items()}, flush=True)
    summary = {}
    for name, rows in res.items():
        summary[name] = {key: f"{np.mean([r[key] for r in rows]):.3f} ± {np.std([r[key] for r in rows]):.3f}"
                         for key in rows[0] if isinstance(rows[0][key], float) and key != "secs"}
    return {"summary": summary, "runs": res}


def _xmodal_1nn(z, y, img_target, hi, ht):
    """Diagnostic (uses labels): fraction of mapped items whose nearest native target-space item
    has the same class -- does the cross-modal mapping carry classes across?"""
    nat, mapped = (hi, ht) if img_target else (ht, hi)
    a, b = z[mapped], z[nat]
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    return float(np.mean(y[mapped] == y[nat][d.argmin(1)]))


def _oracle(y, hi, li, lt):
    """Per-modality k-means labels merged with text clusters mapped (by labels) onto image clusters'
    classes: each modality's clusters are relabelled to their Hungarian-matched class."""
    out = np.zeros(len(y), dtype=np.int64)
    classes = np.unique(y)
    yc = np.searchsorted(classes, y)
    for mask, lab in ((hi, li), (~hi, lt)):
        c = np.zeros((lab.max() + 1, len(classes)))
        np.add.at(c, (lab, yc[mask]), 1)
        r, col = linear_assignment(c, maximize=True)
        mp = np.full(lab.max() + 1, -1)
        mp[r] = col
        unm = mp < 0
        mp[unm] = len(classes) + np.arange(unm.sum())
        out[mask] = mp[lab]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--config", default="", help="JSON overrides of DM2CConfig")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = run(a)
    print(json.dumps(out["summary"], indent=1, ensure_ascii=False))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=str, ensure_ascii=False)
