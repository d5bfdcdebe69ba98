"""Clustering quality on a labelled image-caption feature set, laid out like Table II of the
JECL paper: ACC / NMI / ARI, mean ± std over seeds, for

* k-means on image, text and concatenated (each L2-normalised) features;
* DEC on image and on text features;
* DM2C on the mixed-modal protocol (each item keeps its image or its caption, at random);
* JECL and its ablations (no alignment loss, no regulariser, neither; no cluster matching);
* JECL with 25 / 50 / 75 % of the captions removed (a seeded random subset per seed).

Example (features of the demo run: `make demo` first, or any `raymmc run` directory)::

    python benchmarks/quality.py --features runs/<kmeans-run> --seeds 5
    python benchmarks/quality.py --features F.npz --methods jecl jecl-missing50 --jecl-config '{"lam": 0.5}'

Every run of a method uses ``seed`` for its own randomness and the protocols use ``seed`` too, so
a row is reproducible; no method sees the labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.base import MultiViewData  # noqa: E402
from raymmc.cluster.pretrain import PAPER_AE  # noqa: E402
from raymmc.cluster.protocols import drop_captions, load_features_npz, mixed_modal  # noqa: E402


def load_any(path: str):
    """An .npz of features, or the run directory of a `raymmc run` (its cached features)."""
    if str(path).endswith(".npz"):
        return load_features_npz(path)
    from raymmc.pipeline import load_run_features

    return load_run_features(path)
from raymmc.cluster.registry import available, make_clusterer  # noqa: E402

try:
    from raymmc.report.metrics import evaluate
except ImportError:  # pragma: no cover -- before raymmc.report.metrics existed
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from scipy.optimize import linear_sum_assignment

    def evaluate(y_true, y_pred):
        t = np.unique(y_true, return_inverse=True)[1]
        p = np.unique(y_pred, return_inverse=True)[1]
        c = np.zeros((p.max() + 1, t.max() + 1))
        np.add.at(c, (p, t), 1)
        r, cc = linear_sum_assignment(-c)
        return {"acc": c[r, cc].sum() / len(t), "nmi": normalized_mutual_info_score(t, p),
                "ari": adjusted_rand_score(t, p)}


@dataclass
class Method:
    name: str
    group: str
    algorithm: str
    config: dict = field(default_factory=dict)
    protocol: Callable[[MultiViewData, int], MultiViewData] | None = None
    note: str = ""


def condition_views(data: MultiViewData, mode: str, dims: int, seed: int = 0, power: float = 0.5) -> MultiViewData:
    """An experiment for issue 13 (not in the product yet): each view L2-normalised, centred on the mean of the
    items that have it ("center"), and PCA-whitened to ``dims`` dimensions ("whiten", fitted on at most 20,000
    of them: each component divided by its standard deviation to ``2 * power``, so 0.5 whitens fully and smaller
    powers only damp the dominant directions); rows of a missing view stay zeros. The algorithms then prepare
    their inputs as usual."""
    from dataclasses import replace

    from sklearn.decomposition import PCA

    from raymmc.cluster.views import l2_normalize

    if mode == "none":
        return data
    out = {}
    for view, has in (("image", data.has_image), ("text", data.has_text)):
        x = getattr(data, view)
        if x is None:
            continue
        has = np.asarray(has, bool)
        x = l2_normalize(np.asarray(x, np.float32))
        present = x[has]
        present = present - present.mean(0)
        if mode == "whiten":
            rng = np.random.default_rng(seed)
            fit_rows = present[rng.permutation(len(present))[:20000]]
            pca = PCA(n_components=min(dims, *fit_rows.shape), random_state=seed).fit(fit_rows)
            present = pca.transform(present) / pca.explained_variance_ ** power
        elif mode != "center":
            raise ValueError(f"unknown conditioning {mode!r}")
        full = np.zeros((len(x), present.shape[1]), np.float32)
        full[has] = present
        out[view] = full
    return replace(data, **out)


def deep_update(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def build_methods(jecl_cfg: dict, dec_cfg: dict, dm2c_cfg: dict) -> list[Method]:
    def missing(frac: float):
        return lambda d, s: drop_captions(d, frac, seed=s)

    def dm2c_mixed(suffix: str, overrides: dict, note: str) -> Method:
        """A DM2C variant on the mixed-modal protocol."""
        return Method(f"dm2c-mixed-{suffix}", "Mixed-modal (one view per item)", "dm2c",
                      deep_update(dm2c_cfg, overrides), lambda d, s: mixed_modal(d, seed=s), note)

    m = [
        Method("kmeans-image", "Single-view (image)", "kmeans", {"view": "image"}),
        Method("dec-image", "Single-view (image)", "dec", deep_update(dec_cfg, {"view": "image"})),
        Method("kmeans-text", "Single-view (text)", "kmeans", {"view": "text"}),
        Method("dec-text", "Single-view (text)", "dec", deep_update(dec_cfg, {"view": "text"})),
        Method("kmeans-concat", "Concatenation of both views", "kmeans", {"view": "concat"}),
        Method("dec-concat", "Concatenation of both views", "dec", deep_update(dec_cfg, {"view": "concat"})),
        Method("kmeans-concat-missing50", "Concatenation of both views", "kmeans", {"view": "concat"},
               missing(0.5), "50% captions removed"),
        Method("dm2c-mixed", "Mixed-modal (one view per item)", "dm2c", dm2c_cfg,
               lambda d, s: mixed_modal(d, seed=s), "each item keeps image or text"),
        dm2c_mixed("mean", {"loss_reduction": "mean"},
                   "element-mean reconstruction and cycle losses (the public code's)"),
        dm2c_mixed("auto", {"target_modality": "auto"},
                   "target space chosen by the label-free rule (higher latent silhouette)"),
        dm2c_mixed("text", {"target_modality": "text"}, "images mapped into the text space"),
        dm2c_mixed("sinkhorn", {"alignment": "sinkhorn"},
                   "critic-free: Sinkhorn divergence instead of the WGAN critics"),
        dm2c_mixed("sinkhorn10", {"alignment": "sinkhorn", "lambda_adv": 10.0}, "Sinkhorn divergence, weight 10"),
        Method("kmeans-concat-mixed", "Mixed-modal (one view per item)", "kmeans", {"view": "concat"},
               lambda d, s: mixed_modal(d, seed=s), "each item keeps image or text"),
        Method("jecl", "JECL", "jecl", jecl_cfg),
        Method("jecl-noalign", "JECL", "jecl", deep_update(jecl_cfg, {"align": False}), note="w/o alignment"),
        Method("jecl-noreg", "JECL", "jecl", deep_update(jecl_cfg, {"regularize": False}), note="w/o regularizer"),
        Method("jecl-neither", "JECL", "jecl", deep_update(jecl_cfg, {"align": False, "regularize": False}),
               note="w/o alignment & regularizer"),
        Method("jecl-nomatch", "JECL", "jecl", deep_update(jecl_cfg, {"match_clusters": False, "init_mode": "per_view"}),
               note="per-view init without Hungarian matching"),
    ]
    m.append(Method("jecl-lam0.5", "JECL", "jecl", deep_update(jecl_cfg, {"lam": 0.5}), note="the paper's lam = 0.5"))
    m.append(Method("jecl-paper-ae", "JECL", "jecl",
                    deep_update(jecl_cfg, {"image_ae": dict(PAPER_AE), "text_ae": dict(PAPER_AE)}),
                    note="DEC's d-500-500-2000-10 autoencoders"))
    m.append(Method("dec-image-paper-ae", "Single-view (image)", "dec",
                    deep_update(dec_cfg, {"view": "image", "ae": dict(PAPER_AE)}), note="d-500-500-2000-10"))
    m.append(Method("dec-text-paper-ae", "Single-view (text)", "dec",
                    deep_update(dec_cfg, {"view": "text", "ae": dict(PAPER_AE)}), note="d-500-500-2000-10"))
    for frac in (0.25, 0.5, 0.75):
        pct = int(frac * 100)
        m.append(Method(f"jecl-missing{pct}", "JECL, missing captions", "jecl", jecl_cfg, missing(frac),
                        f"{pct}% captions removed"))
    per_view = deep_update(jecl_cfg, {"init_mode": "per_view"})
    m.append(Method("jecl-perview", "JECL", "jecl", per_view,
                    note="the paper's start: k-means per view, Hungarian matching"))
    m.append(Method("jecl-perview-missing50", "JECL, missing captions", "jecl", per_view, missing(0.5),
                    "50% captions removed; the paper's per-view start"))
    input_init = deep_update(jecl_cfg, {"init_mode": "input"})
    m.append(Method("jecl-inputinit", "JECL", "jecl", input_init,
                    note="self-training from the concatenated input k-means partition"))
    m.append(Method("jecl-inputinit-missing50", "JECL, missing captions", "jecl", input_init, missing(0.5),
                    "50% captions removed; from the concatenated input k-means partition"))
    paper_target = deep_update(jecl_cfg, {"target": "per_view", "text_loss_norm": "captioned"})
    m.append(Method("jecl-papertarget", "JECL, missing captions", "jecl", paper_target,
                    note="paper's joint target, text terms per captioned item"))
    m.append(Method("jecl-papertarget-missing50", "JECL, missing captions", "jecl", paper_target, missing(0.5),
                    "50% captions removed; paper's joint target, text terms per captioned item"))
    return m


DEFAULT = ["kmeans-image", "dec-image", "kmeans-text", "dec-text", "kmeans-concat", "kmeans-concat-missing50",
           "dm2c-mixed", "kmeans-concat-mixed", "jecl", "jecl-noalign", "jecl-noreg", "jecl-neither",
           "jecl-nomatch", "jecl-perview", "jecl-lam0.5", "jecl-missing25", "jecl-missing50", "jecl-missing75"]


def fit_score(method: Method, data: MultiViewData, labels: np.ndarray, k: int, seed: int) -> tuple[list, float]:
    """[acc, nmi, ari] and, where the protocol removed captions, the NMI of the items that kept theirs
    and of those that lost it (so the cause of a loss is visible), NaN otherwise."""
    d = method.protocol(data, seed) if method.protocol else data
    t0 = time.time()
    est = make_clusterer(method.algorithm, k, method.config, seed=seed)
    pred = est.fit(d).predict(d)
    seconds = time.time() - t0
    e = evaluate(labels, pred)
    removed = np.asarray(data.has_text, bool) & ~np.asarray(d.has_text, bool)
    kept = np.asarray(d.has_text, bool)
    halves = [float("nan"), float("nan")]
    if removed.any() and kept.any():
        halves = [evaluate(labels[kept], pred[kept])["nmi"], evaluate(labels[removed], pred[removed])["nmi"]]
    return [e["acc"], e["nmi"], e["ari"], *halves], seconds


def summarize(method: Method, seeds: list[int], scores: list, seconds: list) -> dict[str, Any]:
    s = np.asarray(scores)
    return {"name": method.name, "group": method.group, "note": method.note, "seeds": seeds,
            "acc": s[:, 0].tolist(), "nmi": s[:, 1].tolist(), "ari": s[:, 2].tolist(),
            "mean": s[:, :3].mean(0).tolist(), "std": s[:, :3].std(0).tolist(),
            "nmi_captioned": s[:, 3].tolist(), "nmi_removed": s[:, 4].tolist(), "seconds": float(np.mean(seconds))}


def _worker_task(task: tuple) -> tuple[str, int, list, float]:
    """One (method, seed) fit in a worker process (the methods are rebuilt there: their
    protocols are closures)."""
    features, cfgs, name, k, seed, threads, condition = task
    import torch

    torch.set_num_threads(threads)
    data, labels = load_any(features)
    data = condition_views(data, *condition)
    method = {m.name: m for m in build_methods(*cfgs)}[name]
    score, sec = fit_score(method, data, labels, k, seed)
    return name, seed, score, sec


def _log(name: str, seed: int, score: list, sec: float) -> None:
    print(f"  {name} seed {seed}: ACC {score[0]:.3f} NMI {score[1]:.3f} ARI {score[2]:.3f} ({sec:.1f}s)"
          + (f" NMI captioned {score[3]:.3f} removed {score[4]:.3f}" if not np.isnan(score[3]) else ""),
          file=sys.stderr, flush=True)


def format_table(rows: list[dict], title: str) -> str:
    out = [f"### {title}", "", "| method | ACC | NMI | ARI | s/run | note |", "|---|---|---|---|---|---|"]
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            out.append(f"| *{group}* | | | | | |")
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(r["mean"], r["std"])]
        note = r["note"]
        if not np.isnan(r["nmi_captioned"]).all():
            kept, lost = np.asarray(r["nmi_captioned"]), np.asarray(r["nmi_removed"])
            note += (f"; NMI of items that kept their caption {kept.mean():.3f} ± {kept.std():.3f}, "
                     f"that lost it {lost.mean():.3f} ± {lost.std():.3f}")
        out.append(f"| {r['name']} | {' | '.join(cells)} | {r['seconds']:.1f} | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True,
                    help="a run directory of `raymmc run` (e.g. runs/kmeans-...), or an .npz with image, text, labels")
    ap.add_argument("--seeds", type=int, default=5, help="how many seeds: first-seed .. first-seed+N-1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=None,
                    help="method names (default: the Table II set); 'all' for every method")
    ap.add_argument("--k", type=int, default=None, help="number of clusters (default: number of labels)")
    ap.add_argument("--jecl-config", default="{}", help="JSON overrides of JECLConfig")
    ap.add_argument("--dec-config", default="{}", help="JSON overrides of DECConfig")
    ap.add_argument("--dm2c-config", default="{}", help="JSON overrides of DM2CConfig")
    ap.add_argument("--json", default=None, help="also write the per-seed results here")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per fit (0 = torch's default in-process, 1 in --jobs workers)")
    ap.add_argument("--jobs", type=int, default=1, help="fits run in parallel processes (one per (method, seed))")
    ap.add_argument("--condition", choices=["none", "center", "whiten"], default="none",
                    help="per-view conditioning before every method (an experiment, issue 13)")
    ap.add_argument("--pca-dims", type=int, default=128, help="dimensions kept by --condition whiten")
    ap.add_argument("--whiten-power", type=float, default=0.5,
                    help="--condition whiten divides each component by its variance to this power (0.5: full)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data, labels = load_any(args.features)
    if labels is None:
        ap.error(f"{args.features} has no 'labels' array")
    k = args.k or len(np.unique(labels))
    methods = build_methods(json.loads(args.jecl_config), json.loads(args.dec_config), json.loads(args.dm2c_config))
    by_name = {m.name: m for m in methods}
    names = DEFAULT if not args.methods else ([m.name for m in methods] if args.methods == ["all"] else args.methods)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(by_name)}")
    have = set(available())
    selected = []
    for name in names:
        if by_name[name].algorithm not in have:
            print(f"skipping {name}: raymmc.cluster.{by_name[name].algorithm} is not available", file=sys.stderr)
        else:
            selected.append(by_name[name])
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict[str, dict[int, tuple[list, float]]] = {m.name: {} for m in selected}
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        cfgs = (json.loads(args.jecl_config), json.loads(args.dec_config), json.loads(args.dm2c_config))
        condition = (args.condition, args.pca_dims, 0, args.whiten_power)
        tasks = [(args.features, cfgs, m.name, k, s, args.threads or 1, condition) for m in selected for s in seeds]
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for name, seed, score, sec in pool.map(_worker_task, tasks):
                results[name][seed] = (score, sec)
                if not args.quiet:
                    _log(name, seed, score, sec)
    else:
        # --jobs workers condition their own copy
        data = condition_views(data, args.condition, args.pca_dims, 0, args.whiten_power)
        for m in selected:
            for seed in seeds:
                score, sec = fit_score(m, data, labels, k, seed)
                results[m.name][seed] = (score, sec)
                if not args.quiet:
                    _log(m.name, seed, score, sec)
    rows = [summarize(m, seeds, [results[m.name][s][0] for s in seeds], [results[m.name][s][1] for s in seeds])
            for m in selected]
    title = (f"{Path(args.features).name}: {len(labels)} items, k = {k}, {args.seeds} seeds (mean ± std), "
             f"captioned {int(data.has_text.sum())}, conditioning {args.condition}")
    print(format_table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps({"features": args.features, "k": k, "rows": rows,
                                               "jecl_config": json.loads(args.jecl_config),
                                               "condition": args.condition, "pca_dims": args.pca_dims,
                                               "whiten_power": args.whiten_power}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
