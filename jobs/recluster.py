"""Ray job: re-cluster a growing archive on a schedule.

Each run is named ``<name>-<UTC timestamp>`` under the output root and reuses the feature cache
(``extract.cache``, default ``<output>/features-cache``): files already extracted with the same
encoder settings are not read again, only new or changed files are. With pretrained encoders
(mobilenet_v2/resnet, minilm) that is every unchanged file; tfidf/doc2vec are fitted on the whole
archive, so a grown archive re-encodes every caption. After a successful run, ``<output>/latest.json``
points at it (run URI, time, counts, previous run); a failed run leaves the pointer alone.

    # once, e.g. from cron:  0 3 * * *  ray job submit --working-dir . -- python jobs/recluster.py ...
    ray job submit --working-dir . -- python jobs/recluster.py --config jobs/configs/gpu_cluster.yaml \
        --name nightly
    # or as one long-running job that re-clusters every 24 hours:
    ray job submit --working-dir . -- python jobs/recluster.py --config ... --name nightly --every 1440
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster_archive as job  # noqa: E402  (ensures raymmc is importable)

from raymmc.config import ConfigError  # noqa: E402
from raymmc.io import storage  # noqa: E402


def run_name(name: str, now: dt.datetime) -> str:
    return f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}"


def update_pointer(cfg, result, now: dt.datetime, pointer: str = "latest.json") -> dict:
    """Write ``<output>/<pointer>`` naming ``result``; returns what was written."""
    uri = storage.join(cfg.output, pointer)
    previous = None
    if storage.exists(uri, cfg.storage):
        try:
            previous = storage.read_json(uri, cfg.storage).get("run_uri")
        except Exception:  # noqa: BLE001 - an unreadable pointer is replaced
            previous = None
    m = result.manifest
    doc = {
        "run": cfg.run_name,
        "run_uri": result.run_uri,
        "time_utc": now.isoformat(),
        "input": m["inputs"]["uri"],
        "counts": m["counts"],
        "features": m["features"],
        "metrics": {k: v for k, v in result.metrics.items() if k != "cluster_sizes"},
        "previous_run_uri": previous,
    }
    storage.write_json(uri, doc, cfg.storage)
    return doc


def recluster_once(args, name: str, pointer: str) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    try:
        cfg = job.config_from_args(args, run_name=run_name(name, now))
        result = job.run_job(cfg)
    except ConfigError as exc:
        print(f"recluster: config error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job's exit status carries the failure
        traceback.print_exc()
        return 1
    doc = update_pointer(cfg, result, now, pointer)
    f = doc["features"]
    print(f"features: {f['files_cached']} file(s) from the cache, {f['files_extracted']} extracted")
    job.report(result)
    print(f"pointer: {storage.join(cfg.output, pointer)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = job.build_parser(__doc__)
    parser.add_argument("--name", default="recluster", help="run name prefix (default: recluster)")
    parser.add_argument("--pointer", default="latest.json", help="pointer file in the output root")
    parser.add_argument("--every", type=float, metavar="MINUTES",
                        help="keep running: re-cluster every MINUTES (default: once)")
    args = parser.parse_args(argv)
    if args.run_name:
        parser.error("--run-name is not used here: runs are named <--name>-<UTC timestamp>")
    job.log_environment()
    while True:
        started = time.monotonic()
        code = recluster_once(args, args.name, args.pointer)
        if args.every is None or code == 2:
            return code
        time.sleep(max(0.0, args.every * 60 - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main())
