"""Ray job: cluster one image-caption archive and write a run directory.

    ray job submit --working-dir . -- python jobs/cluster_archive.py --config jobs/configs/laptop.yaml \
        --output /abs/path/runs --set cluster.clusters=11

The same flags as `raymmc run` (--config, --input, --output, --run-name, --algorithm, --clusters,
--seed, repeated --set key=value). Inside a Ray job, $RAY_ADDRESS (set by Ray) points the pipeline
at the cluster that runs the job. Prints the run URI and the metrics (as one JSON line); the exit
status is non-zero on a failed run (1) or a configuration error (2), so the job is marked FAILED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_importable() -> None:
    """Make `raymmc` importable: installed on the cluster, on PYTHONPATH via the job's working
    dir, or else from the repository this script lives in."""
    try:
        import raymmc  # noqa: F401
    except ImportError:
        if os.path.isdir(os.path.join(REPO_ROOT, "raymmc")):
            sys.path.insert(0, REPO_ROOT)
        import raymmc  # noqa: F401


ensure_importable()

from raymmc.cli import add_run_args, cli_values  # noqa: E402
from raymmc.config import ConfigError, RunConfig, load_config  # noqa: E402


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    return parser


def config_from_args(args: argparse.Namespace, **values) -> RunConfig:
    """Defaults <- --config YAML <- flags (and ``values``) <- --set overrides."""
    merged = cli_values(args)
    merged.update({k: v for k, v in values.items() if v is not None})
    return load_config(args.config, args.overrides, merged)


def log_environment() -> None:
    import raymmc

    print(f"python {sys.executable}; raymmc from {os.path.dirname(raymmc.__file__)}; "
          f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')}", flush=True)


def report(result) -> None:
    print(f"run directory: {result.run_uri}")
    m = result.metrics
    if "nmi" in m:
        print("metrics: " + "  ".join(f"{k}={m[k]:.3f}" for k in ("acc", "nmi", "ari") if k in m))
    print("RAYMMC_RESULT " + json.dumps({"run_uri": result.run_uri, "metrics": m}, default=str), flush=True)


def run_job(cfg: RunConfig):
    from raymmc.pipeline import run

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_environment()
    try:
        cfg = config_from_args(args)
        result = run_job(cfg)
    except ConfigError as exc:
        print(f"cluster_archive: config error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job's exit status carries the failure
        traceback.print_exc()
        return 1
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
