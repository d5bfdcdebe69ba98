"""Fixed latency of one Ray Data Parquet read under each reader (`ray.parquet_reader`), on a warm local
cluster: two small files (the size of a small archive's feature cache), read and materialised ``--repeats``
times per reader, the readers interleaved. Prints mean ± std seconds per read and the ratio.

    python benchmarks/parquet_reader.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAYMMC_PROGRESS", "0")

from raymmc.config import RayConfig  # noqa: E402
from raymmc.raysession import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=130, help="rows per file")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args(argv)
    import ray

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for f in range(2):
            table = pa.table({"id": [f"{f}-{i}" for i in range(args.rows)],
                              "image_feat": list(rng.normal(size=(args.rows, 1280)).astype(np.float32))})
            files.append(f"{tmp}/part-{f}.parquet")
            pq.write_table(table, files[-1])
        init_ray(RayConfig(num_cpus=args.num_cpus))
        ray.data.read_parquet(files).materialize()  # warm the cluster's workers
        seconds: dict[str, list[float]] = {"classic": [], "v2": []}
        for _ in range(args.repeats):
            for reader in seconds:
                init_ray(RayConfig(num_cpus=args.num_cpus, parquet_reader=reader))
                start = time.perf_counter()
                ray.data.read_parquet(files).select_columns(["id"]).materialize()
                seconds[reader].append(time.perf_counter() - start)
    for reader, s in seconds.items():
        print(f"{reader:8s} {statistics.mean(s):.2f} ± {statistics.stdev(s):.2f} s per read ({args.repeats} reads)")
    print(f"v2 / classic: {statistics.mean(seconds['v2']) / statistics.mean(seconds['classic']):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
