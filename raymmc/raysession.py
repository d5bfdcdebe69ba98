"""Start or join a Ray cluster, the same way for the CLI, jobs and tests."""

from __future__ import annotations

import contextlib
import os

from raymmc.config import RayConfig

# gensim seeds Doc2Vec inference with hash(): a fixed hash seed in every worker makes it reproducible.
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO: a task or actor given no GPU sees none (CUDA_VISIBLE_DEVICES=""). Ray 2.60
# leaves the node's GPUs visible to it otherwise, and every "auto" device here (the text encoder actors, the
# prediction tasks, Ray Train workers with use_gpu off) would put itself on cuda:0 without Ray having reserved it.
RUNTIME_ENV = {"env_vars": {"PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
                            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}}


def init_ray(cfg: RayConfig | None = None) -> dict:
    """Join ``cfg.address`` / $RAY_ADDRESS, or start a local cluster on 127.0.0.1. Returns its resources."""
    import ray

    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        # Local clusters need no token auth; a cluster the user runs keeps its own setting.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=RUNTIME_ENV)
        else:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False, runtime_env=RUNTIME_ENV)
    # The driver's Ray Data context (datasets carry it to their tasks): set on every call, so that a run's
    # own config applies in a session another caller started.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = os.environ.get("RAYMMC_PROGRESS", "1") != "0"
    context.use_datasource_v2 = cfg.parquet_reader == "v2"
    return ray.cluster_resources()


def has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


@contextlib.contextmanager
def ordered_execution():
    """Ray Data keeps block order inside this block (``preserve_order``), as far as the datasets created
    in it go (a dataset keeps the context it was created under): the Ray Train shards are slices of the
    input order, so a seed reproduces a run exactly. The written assignments mostly follow that order too,
    but an actor pool does not always keep it: readers match rows by id."""
    import ray

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def alive_nodes() -> list[str]:
    """The ids of the cluster's live nodes (recorded in the manifest beside each stage's nodes)."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
