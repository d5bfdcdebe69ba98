"""Ray job: re-cluster a growing archive on a schedule (the same code as `raymmc recluster`).

Runs are named ``<name>-<UTC timestamp>`` under the output root. ``<output>/latest.json`` names the
lineage's last successful run: the first run is a plain `raymmc run` (config from --config/--set); each
later one re-clusters from the run the pointer names: its config (later --set values apply; the encoders
never change within a lineage), its feature cache (only new or changed files are extracted, with its
fitted text encoder), a warm start from its model, cluster ids kept stable by item overlap, and
``drift.json`` saying what changed. An unchanged archive reuses the model and moves nothing. A failed run
leaves the pointer alone.

    # from cron (nightly at 03:00; docs/recluster.md has a KubeRay CronJob too):
    0 3 * * *  RAY_ADDRESS=http://head:8265 ray job submit --working-dir /opt/raymmc -- \
        python jobs/recluster.py --config jobs/configs/gpu_cluster.yaml --name nightly
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


def previous_run(cfg, pointer: str) -> str | None:
    """The run ``<output>/<pointer>`` names, or None (no pointer yet: the lineage starts)."""
    uri = storage.join(cfg.output, pointer)
    if not storage.exists(uri, cfg.storage):
        return None
    return storage.read_json(uri, cfg.storage)["run_uri"]


def recluster_once(args, name: str, pointer: str) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    try:
        cfg = job.config_from_args(args, run_name=run_name(name, now))
        previous = previous_run(cfg, pointer)
        if previous is None:
            result = job.run_job(cfg)
        else:
            from raymmc.recluster import recluster

            result = recluster(previous, cfg.output, input_uri=cfg.input, run_name=cfg.run_name,
                               overrides=args.overrides, storage_options=cfg.storage)
    except ConfigError as exc:
        print(f"recluster: config error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job's exit status carries the failure
        traceback.print_exc()
        return 1
    doc = update_pointer(cfg, result, now, pointer)
    f = doc["features"]
    print(f"features: {f['files_cached']} file(s) from the cache, {f['files_extracted']} extracted")
    if "recluster" in result.manifest:
        r = result.manifest["recluster"]
        print(f"recluster: {r['start']} start; {r['moved']} of {r['kept']} kept items changed cluster")
    job.report(result)
    print(f"pointer: {storage.join(cfg.output, pointer)}")
    return 0


def build_parser():
    parser = job.build_parser(__doc__)
    parser.add_argument("--name", default="recluster", help="run name prefix (default: recluster)")
    parser.add_argument("--pointer", default="latest.json", help="pointer file in the output root")
    parser.add_argument("--every", type=float, metavar="MINUTES",
                        help="keep running: re-cluster every MINUTES (default: once)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
