"""``python -m raymmc.datasets NAME OUT [--limit N] [--rows-per-shard N] [--cache DIR]``."""

from __future__ import annotations

import argparse
import json
import sys

from raymmc.datasets import NAMES, DatasetError, build
from raymmc.io.storage import StorageOptions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raymmc.datasets", description="Build a demo archive.")
    p.add_argument("name", choices=NAMES)
    p.add_argument("out", help="output directory: local path, file:// or s3:// prefix")
    p.add_argument("--limit", type=int, default=None, help="at most this many items (class-proportional)")
    p.add_argument("--rows-per-shard", type=int, default=None)
    p.add_argument("--cache", default=None, help="download cache (default $RAYMMC_CACHE or ~/.cache/raymmc)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// outputs")
    args = p.parse_args(argv)
    try:
        summary = build(args.name, args.out, cache_dir=args.cache, limit=args.limit,
                        rows_per_shard=args.rows_per_shard,
                        storage_options=StorageOptions(endpoint_url=args.endpoint_url))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
