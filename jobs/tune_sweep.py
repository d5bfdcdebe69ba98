"""Ray job: a `raymmc tune` sweep (the same code as the CLI) on the cluster the job is submitted to.

    ray job submit --working-dir . -- python jobs/tune_sweep.py --config jobs/configs/tune_jecl.yaml \
        --input s3://bucket/archive/ --output s3://bucket/sweeps/ --run-name jecl-0412 --clusters 10:30 --trials 24

Trials search the algorithm's hyperparameters (raymmc/train/tune_space.py; ``tune.space`` in the config narrows or
widens them) and, with ``--clusters LO:HI``, the number of clusters, and are ranked by a label-free score
(``tune.score``; docs/tune.md). The sweep directory holds trials.csv, best.json, best.yaml (a run config of the
winner), the winner's run on the whole archive (best/) and report/index.html. The last line printed is
``RAYMMC_TUNE {json}`` (the sweep URI and best.json) for whatever schedules the job.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster_archive as job  # noqa: E402  (ensures raymmc is importable)

from raymmc.cli import add_run_args, cli_values  # noqa: E402
from raymmc.config import ConfigError, load_config  # noqa: E402


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, clusters_range=True)
    parser.add_argument("--trials", type=int, help="number of trials (tune.trials)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from raymmc.sweep import tune

    args = build_parser().parse_args(argv)
    job.log_environment()
    try:
        values = cli_values(args)
        if args.trials is not None:
            values["tune"] = {"trials": args.trials}
        cfg = load_config(args.config, args.overrides, values)
        result = tune(cfg, clusters=args.clusters)
    except ConfigError as exc:
        print(f"tune_sweep: config error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job's exit status carries the failure
        traceback.print_exc()
        return 1
    print("RAYMMC_TUNE " + json.dumps({"sweep": result.sweep_uri, "best": result.best,
                                       "summary": result.manifest["summary"]}, default=str), flush=True)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
