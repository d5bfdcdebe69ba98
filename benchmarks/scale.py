"""Does `raymmc run` scale? The driver's peak memory and the wall time at N, 4N and 16N items.

    .venv/bin/python benchmarks/scale.py [--items 20000] [--factors 1 4 16] [--set key=value ...]

Each size is a synthetic text-only archive (TF-IDF captions: the cheapest encoder, so the run is about the
pipeline, not a CNN) of 10 topics in shards of 10,000 rows, clustered by `raymmc run` (k-means, K=10, report
on) as a new user runs it, in its own process and its own local Ray cluster. The driver's peak RSS is that
process's own ``ru_maxrss`` (Ray's raylet, GCS and workers are other processes: what must not grow with the
archive is the driver). Printed: per size the driver's peak RSS and wall time, then the driver's growth per
added item between consecutive sizes and from N to 16N (target < 100 bytes) and time(4N)/time(N) (target
<= 4.4; Ray's fixed start-up makes small N look better than it is, so 16N/4N is printed too).

The driver does hold bounded samples, each capped by config: the captions a fitted text encoder learns from
(``extract.text.fit_sample``, 1M by default) and, for an in-process fit, the features of up to
``cluster.train.local_max_items`` (100k) items; above the caps nothing more is added. To measure what grows
beyond the caps at sizes this machine runs in minutes, the benchmark lowers them (``CAPS`` below: 2,000
captions, every fit on Ray Train workers); ``--default-caps`` measures the shipped defaults instead, where
below 100k items the driver grows by the in-process fit's features (about 1.5-4 KB per item with TF-IDF).
``--set`` adds config overrides to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYMMC_PROGRESS", "0")

TOPICS = 10
ROWS_PER_SHARD = 10_000
CAPS = ["cluster.train.local_max_items=0", "extract.text.fit_sample=2000"]


def make_archive(n: int, out: str, seed: int = 0) -> str:
    """``n`` captions of 10 topics (8 words: 5 from the topic's 40, 3 from 200 shared ones), label = topic."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fu"]
    words = sorted({a + b + c for a in syllables for b in syllables for c in syllables})
    order = rng.permutation(len(words))
    topic_words = [[words[j] for j in order[t * 40:(t + 1) * 40]] for t in range(TOPICS)]
    shared = [words[j] for j in order[TOPICS * 40:TOPICS * 40 + 200]]
    os.makedirs(out, exist_ok=True)
    for s in range(0, n, ROWS_PER_SHARD):
        m = min(ROWS_PER_SHARD, n - s)
        topic = rng.integers(0, TOPICS, m)
        captions = [" ".join(list(rng.choice(topic_words[t], 5)) + list(rng.choice(shared, 3))) for t in topic]
        pq.write_table(pa.table({"id": [f"item-{s + i:09d}" for i in range(m)], "caption": captions,
                                 "label": [f"topic-{t}" for t in topic]}),
                       os.path.join(out, f"part-{s // ROWS_PER_SHARD:05d}.parquet"))
    return out


def child(args: list[str], out: str) -> None:
    """One `raymmc run` in this process; writes its wall time and this process's peak RSS to ``out``."""
    from raymmc.cli import main

    t0 = time.perf_counter()
    code = main(args)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    with open(out, "w") as f:
        json.dump({"code": code, "wall_s": wall, "peak_rss_bytes": peak_kib * 1024}, f)


def measure(n: int, root: str, overrides: list[str]) -> dict:
    archive = make_archive(n, os.path.join(root, f"archive-{n}"))
    result = os.path.join(root, f"result-{n}.json")
    args = ["run", "--input", archive, "--output", os.path.join(root, "runs"), "--run-name", f"n{n}",
            "--clusters", str(TOPICS), "--set", "extract.image.model=none", "--set", "extract.text.model=tfidf",
            "--set", "cluster.kmeans.view=text", "--set", f"extract.cache={root}/cache-{n}"]
    for o in overrides:
        args += ["--set", o]
    subprocess.run([sys.executable, __file__, "--child", result, "--", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(result) as f:
        out = json.load(f)
    if out["code"] != 0:
        raise SystemExit(f"raymmc run failed on {n} items (exit {out['code']})")
    manifest = json.load(open(os.path.join(root, "runs", f"n{n}", "manifest.json")))
    metrics = json.load(open(os.path.join(root, "runs", f"n{n}", "metrics.json")))
    return {"items": n, **out, "stages": manifest["stage_seconds"], "nmi": metrics.get("nmi"),
            "assigned": manifest["counts"]["assigned"]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[sys.argv.index("--") + 1:], sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--default-caps", action="store_true", help="keep the shipped caps (see the docstring)")
    a = p.parse_args()
    if not a.default_caps:
        a.overrides = CAPS + a.overrides
    print(f"config overrides: {' '.join(a.overrides) or '(none)'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raymmc-scale-") as root:
        for f in a.factors:
            r = measure(a.items * f, root, a.overrides)
            rows.append(r)
            stages = " ".join(f"{k}={v:.1f}" for k, v in sorted(r["stages"].items()))
            print(f"{r['items']:>9,} items: driver peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB, "
                  f"wall {r['wall_s']:6.1f} s, NMI {r['nmi']:.3f}  [{stages}]", flush=True)
    print()
    for lo, hi in zip(rows, rows[1:]):
        growth = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / (hi["items"] - lo["items"])
        print(f"{lo['items']:,} -> {hi['items']:,}: driver +{growth:.1f} bytes per added item; "
              f"time ratio {hi['wall_s'] / lo['wall_s']:.2f} for x{hi['items'] / lo['items']:g} items")
    first, last = rows[0], rows[-1]
    growth = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (last["items"] - first["items"])
    print(f"{first['items']:,} -> {last['items']:,}: driver +{growth:.1f} bytes per added item (target < 100)")
    if len(rows) >= 2:
        print(f"time(4N)/time(N) = {rows[1]['wall_s'] / rows[0]['wall_s']:.2f} (target <= 4.4)")


if __name__ == "__main__":
    main()
