"""Fixed per-run overhead: the same small `raymmc run` several times on one warm local Ray session, each run's
stage seconds from its manifest. The first run extracts; later ones read the feature cache, so what is left is
start-up cost (prediction, accounting, the fit's set-up).

    .venv/bin/python benchmarks/stage_overhead.py --shards <a `raymmc datasets build tuxpaint` folder> --rows 60
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="a folder of shard Parquet files (its first file is used)")
    ap.add_argument("--rows", type=int, default=60, help="rows taken from the first file, written as 2 files")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clusters", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAYMMC_PROGRESS", "0")

    import pyarrow.parquet as pq

    from raymmc.cli import main as raymmc
    from raymmc.config import RayConfig
    from raymmc.raysession import init_ray

    init_ray(RayConfig(num_cpus=2))
    with tempfile.TemporaryDirectory() as tmp:
        table = pq.read_table(sorted(glob.glob(os.path.join(args.shards, "*.parquet")))[0]).slice(0, args.rows)
        os.makedirs(f"{tmp}/in")
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), f"{tmp}/in/part-0.parquet")
        pq.write_table(table.slice(half), f"{tmp}/in/part-1.parquet")
        for i in range(args.runs):
            start = time.perf_counter()
            code = raymmc(["run", "--input", f"{tmp}/in", "--output", f"{tmp}/out", "--run-name", f"r{i}",
                           "--clusters", str(args.clusters), "--set", "report=false",
                           "--set", "extract.text.model=tfidf", "--set", f"extract.cache={tmp}/cache"])
            assert code == 0, f"run {i} exited with {code}"
            stages = json.load(open(f"{tmp}/out/r{i}/manifest.json"))["stage_seconds"]
            print(f"run {i}: {time.perf_counter() - start:.1f} s  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in sorted(stages.items())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
