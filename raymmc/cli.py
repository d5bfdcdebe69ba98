"""The `raymmc` command line. It only parses arguments and composes the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from raymmc.config import ConfigError, load_config
from raymmc.io.formats.options import FORMATS
from raymmc.io.rundir import RunLocationError
from raymmc.io.safestate import UnsafeStateError
from raymmc.io.shards import ShardError
from raymmc.io.storage import StorageError


def add_run_args(p: argparse.ArgumentParser, clusters_range: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (see jobs/configs/)")
    p.add_argument("--input", help="archive URI: local dir, file://, s3://, gs:// (default: the demo data)")
    p.add_argument("--input-format", choices=FORMATS,
                   help="archive format (default auto: detected, and the manifest says what and why): shards, "
                        "img2dataset, webdataset, coco, embeddings (archive.format)")
    p.add_argument("--output", help="where run directories are created (default: ./runs)")
    p.add_argument("--run-name", help="run directory name (default: <algorithm>-<timestamp>)")
    p.add_argument("--algorithm", help="kmeans | dec | jecl | dm2c | mmdc | auto (picks from the data's modalities)")
    if clusters_range:
        p.add_argument("--clusters", help="number of clusters K, or LO:HI to choose K by the label-free score")
    else:
        p.add_argument("--clusters", type=int, help="number of clusters K")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-parallel Ray workers for the clustering (any algorithm; "
                   "cluster.train.workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set extract.image.model=resnet50 (repeatable)")


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, dest in (("input", "input"), ("output", "output"), ("run_name", "run_name"), ("seed", "seed")):
        if getattr(args, dest, None) is not None:
            values[key] = getattr(args, dest)
    if getattr(args, "input_format", None) is not None:
        values["archive"] = {"format": args.input_format}
    cluster = {}
    if args.algorithm is not None:
        cluster["algorithm"] = args.algorithm
    if isinstance(args.clusters, int):
        cluster["clusters"] = args.clusters
    if getattr(args, "workers", None) is not None:
        cluster["train"] = {"workers": args.workers}
    if cluster:
        values["cluster"] = cluster
    return values


def cmd_run(args: argparse.Namespace) -> int:
    from raymmc.pipeline import resume, run

    if args.resume:
        result = resume(args.resume)
    else:
        cfg = load_config(args.config, args.overrides, cli_values(args))
        result = run(cfg)
    print(f"\nrun directory: {result.run_uri}")
    m = result.metrics
    if "nmi" in m:
        print("metrics: " + "  ".join(f"{k}={m[k]:.3f}" for k in ("acc", "nmi", "ari", "purity", "f_score")))
    print("cluster sizes: " + json.dumps(m["cluster_sizes"]))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from raymmc.features.extract import run_extraction
    from raymmc.io.formats import discover_input
    from raymmc.pipeline import used_modalities
    from raymmc.raysession import has_gpu, init_ray

    cfg = load_config(args.config, args.overrides, cli_values(args))
    if not cfg.input:
        raise ConfigError("raymmc extract needs --input")
    found = discover_input(cfg.input, cfg.storage, cfg.archive)
    print(f"input {cfg.input}: {found.format} ({found.why})")
    shards = found.shards
    init_ray(cfg.ray)
    dirs, stats = run_extraction(shards, cfg.extract.cache or cfg.output, extract_cfg=cfg.extract, seed=cfg.seed,
                                 storage=cfg.storage, has_gpu=has_gpu(), modalities=used_modalities(cfg))
    print(f"features of {len(dirs)} file(s) under {stats.cache}")
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from raymmc.io.storage import StorageOptions
    from raymmc.pipeline import assign

    opts = StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    result = assign(args.model, args.input, args.output, run_name=args.run_name, storage_options=opts,
                    input_format=args.input_format)
    print(f"\nassignments: {result.run_uri}")
    print("cluster sizes: " + json.dumps(result.metrics["cluster_sizes"]))
    return 0


def cmd_recluster(args: argparse.Namespace) -> int:
    from raymmc.io.storage import StorageOptions
    from raymmc.recluster import recluster

    opts = StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    result = recluster(args.previous, args.output, input_uri=args.input, run_name=args.run_name,
                       overrides=args.overrides, warm=not args.cold, storage_options=opts)
    m, r = result.manifest, result.manifest["recluster"]
    print(f"\nrun directory: {result.run_uri}")
    print(f"features: {m['features']['files_cached']} file(s) from the cache, {m['features']['files_extracted']} "
          f"extracted; {r['start']} start; {r['moved']} of {r['kept']} kept items changed cluster "
          f"(drift.json)")
    print("cluster sizes: " + json.dumps(result.metrics["cluster_sizes"]))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raymmc.sweep import tune

    values = cli_values(args)
    if args.trials is not None:
        values["tune"] = {"trials": args.trials}
    cfg = load_config(args.config, args.overrides, values)
    result = tune(cfg, clusters=args.clusters)
    print(f"\nsweep directory: {result.sweep_uri}")
    s = result.manifest["summary"]
    print(f"{s['trials']} trial(s): {s['completed']} completed, {s['stopped_early']} stopped early by ASHA, "
          f"{s['failed']} failed")
    if s.get("spearman_score_nmi") is not None:
        print(f"Spearman(score, NMI) over the completed trials (labels only checked, never used): "
              f"{s['spearman_score_nmi']:.3f}")
    if result.best is None:
        print("no trial completed: nothing chosen", file=sys.stderr)
        return 1
    b = result.best
    print(f"best: K={b['clusters']} {json.dumps(b['params'])} {b['score_name']}={b['score']:.4f} "
          f"(its run on the whole archive: {b['run_score']:.4f}) -> {b['run']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from raymmc import datasets

    if args.action == "list":
        print("\n".join(datasets.NAMES))
        return 0
    from raymmc.io.storage import StorageOptions

    try:
        summary = datasets.build(args.name, args.out, limit=args.limit, cache_dir=args.cache,
                                 rows_per_shard=args.rows_per_shard,
                                 storage_options=StorageOptions(endpoint_url=args.endpoint_url))
    except datasets.DatasetError as exc:
        print(f"raymmc: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymmc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="cluster an archive (no --input: the demo data set)")
    add_run_args(p_run)
    p_run.add_argument("--resume", metavar="RUN", help="continue an interrupted run directory with its own config")
    p_run.set_defaults(func=cmd_run)

    p_ex = sub.add_parser("extract", help="extract features only (into --output, the feature cache)")
    add_run_args(p_ex)
    p_ex.set_defaults(func=cmd_extract)

    p_as = sub.add_parser("assign", help="assign new items to an existing run's clusters, without retraining")
    p_as.add_argument("--model", required=True, help="run directory of a finished `raymmc run`")
    p_as.add_argument("--input", required=True, help="archive URI of the new items")
    p_as.add_argument("--output", required=True, help="where the assignment run directory is created")
    p_as.add_argument("--run-name")
    p_as.add_argument("--input-format", choices=FORMATS, help="format of the new items (default: the run's "
                      "archive.format, auto unless it was set)")
    p_as.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p_as.set_defaults(func=cmd_assign)

    p_rc = sub.add_parser("recluster", help="re-cluster a grown archive from a previous run: cached features, "
                          "warm start, stable cluster ids, drift.json")
    p_rc.add_argument("--previous", required=True, metavar="RUN", help="the previous run directory of the lineage")
    p_rc.add_argument("--input", help="archive URI (default: the previous run's input)")
    p_rc.add_argument("--output", required=True, help="where the new run directory is created")
    p_rc.add_argument("--run-name", help="run directory name (default: recluster-<timestamp>)")
    p_rc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key of the previous run's config (not extract.*; repeatable)")
    p_rc.add_argument("--cold", action="store_true", help="train from scratch instead of from the previous model")
    p_rc.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p_rc.set_defaults(func=cmd_recluster)

    p_tu = sub.add_parser("tune", help="a Ray Tune sweep over an algorithm's hyperparameters (and K), chosen by a "
                          "label-free score; trials.csv, best.json, the winner's run directory")
    add_run_args(p_tu, clusters_range=True)
    p_tu.add_argument("--trials", type=int, help="number of trials (tune.trials)")
    p_tu.set_defaults(func=cmd_tune)

    p_ds = sub.add_parser("datasets", help="build demo archives from public data")
    ds_sub = p_ds.add_subparsers(dest="action", required=True)
    ds_sub.add_parser("list", help="the data sets that can be built")
    p_build = ds_sub.add_parser("build", help="write NAME as Parquet shards to OUT")
    p_build.add_argument("name")
    p_build.add_argument("out")
    p_build.add_argument("--limit", type=int, help="keep at most this many items (class-proportional)")
    p_build.add_argument("--rows-per-shard", type=int)
    p_build.add_argument("--cache", help="download cache (default $RAYMMC_CACHE or ~/.cache/raymmc)")
    p_build.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// outputs")
    p_ds.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"raymmc: config error: {exc}", file=sys.stderr)
        return 2
    except (ShardError, StorageError, UnsafeStateError, RunLocationError) as exc:
        # Bad input, unreachable or misbehaving storage, a refused file: the message says which and why.
        print(f"raymmc: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
