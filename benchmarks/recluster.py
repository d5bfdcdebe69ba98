"""Warm against cold re-clustering of a grown archive (docs/recluster.md).

An archive is built in 4 files; v1 is the first 3 (75%), v2 all 4. For each algorithm: `raymmc run` on
v1, then `raymmc recluster` of v2 from it twice, warm (from v1's model) and cold (--cold; cluster ids are
matched by item overlap either way), and once more on the unchanged v2. Printed per algorithm and growth
order: the training time (the manifest's "cluster" stage) and wall time of each, the share of v1's items
that keep their cluster id, and NMI against the labels.

    python benchmarks/recluster.py --dataset stamps-icons --clusters 21 --order random
    python benchmarks/recluster.py --dataset stamps-icons --clusters 21 --order classes   # new categories arrive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

os.environ.setdefault("RAYMMC_PROGRESS", "0")  # the printed rows, not Ray Data's progress bars


def build(dataset: str, out: str, order: str) -> list[str]:
    from raymmc import datasets
    from raymmc.datasets.shards import write_shards

    table = datasets.collect(dataset).table()
    if order == "random":  # the archive grows by more of the same
        table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    # "classes": source order, so the 4th file brings mostly categories v1 has little of
    return sorted(write_shards(table, out, -(-table.num_rows // 4)))


def assignments(run: str) -> dict:
    from raymmc.io.rundir import RunDir

    t = RunDir(run).read_table("assignments")
    return dict(zip(t.column("id").to_pylist(), t.column("cluster").to_pylist()))


def timed(argv: list[str]) -> float:
    from raymmc.cli import main

    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"failed: {argv}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="stamps-icons")
    p.add_argument("--clusters", type=int, default=21)
    p.add_argument("--algorithms", nargs="+", default=["kmeans", "jecl"])
    p.add_argument("--order", choices=["random", "classes"], default="random")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    from raymmc.io.rundir import RunDir

    work = args.work or tempfile.mkdtemp(prefix="raymmc-recluster-")
    files = build(args.dataset, os.path.join(work, "full"), args.order)
    sets = sum((["--set", s] for s in args.overrides), [])
    rows = []
    for algorithm in args.algorithms:
        archive, out = os.path.join(work, f"archive-{algorithm}"), os.path.join(work, f"runs-{algorithm}")
        shutil.rmtree(archive, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(archive)
        for f in files[:3]:
            shutil.copy2(f, archive)
        common = ["--set", f"extract.cache={os.path.join(work, 'cache')}", "--set", "report=false", *sets]
        timed(["run", "--input", archive, "--output", out, "--run-name", "v1", "--algorithm", algorithm,
               "--clusters", str(args.clusters), *common])
        shutil.copy2(files[3], archive)
        v1 = assignments(os.path.join(out, "v1"))
        for name, extra, previous in (("warm", [], "v1"), ("cold", ["--cold"], "v1"), ("unchanged", [], "warm")):
            wall = timed(["recluster", "--previous", os.path.join(out, previous), "--output", out,
                          "--run-name", name, *extra])
            run = RunDir(os.path.join(out, name))
            manifest = run.read_json("manifest.json")
            now = assignments(run.uri)
            before = v1 if previous == "v1" else assignments(os.path.join(out, previous))
            kept = sum(now.get(i) == c for i, c in before.items()) / len(before)
            metrics = run.read_json("metrics.json")
            rows.append({"algorithm": algorithm, "order": args.order, "run": name,
                         "start": manifest["recluster"]["start"],
                         "train_s": round(manifest["stage_seconds"].get("cluster", 0.0), 1), "wall_s": round(wall, 1),
                         "kept_ids": round(kept, 4), "moved": manifest["recluster"]["moved"],
                         "files_extracted": manifest["features"]["files_extracted"],
                         "nmi": round(metrics["nmi"], 4) if "nmi" in metrics else None})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| algorithm | growth | run | start | train s | wall s | v1 ids kept | NMI |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['order']} | {r['run']} | {r['start']} | {r['train_s']} | {r['wall_s']} | "
              f"{r['kept_ids']:.1%} | {r['nmi']} |")


if __name__ == "__main__":
    main()
