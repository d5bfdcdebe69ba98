"""Shared fixtures: one local Ray session and one S3-compatible server (moto) per test worker,
and a small real archive (tuxpaint) with every kind of bad input mixed in."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYMMC_PROGRESS", "0")
# Ray Train's controller polls its workers every 2 s (the default): a small fit waits for the poll at its start
# and end. Every Ray process inherits this from the cluster's start. A trivial 2-worker TorchTrainer fit on this
# 2-core machine (scratch script, 2026-12-07): 12.6 s with the default, 9.6 s at 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray kills idle task workers beyond one per CPU after 1 s: between two of the many short runs of a test session
# its task workers die, and the next run starts (and imports into) new ones. Kept alive for the session instead:
# tests/test_columns.py (9 runs) took 113 and 118 s with these, 126 and 140 s without (2026-12-07, alternating).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray workers inherit the environment of the cluster's start: the S3 test server's (dummy)
# credentials must be in place before the session's Ray cluster starts.
# The secret is long and distinctive: a test greps every output for it.
for _key, _value in (("AWS_ACCESS_KEY_ID", "raymmc-test-key"), ("AWS_SECRET_ACCESS_KEY", "raymmc-s3-secret-5b1e9d7c"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


@pytest.fixture()
def one_torch_thread():
    """Small models: one intra-op thread is faster than contended threads and keeps timings steady."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_session():
    """One local 2-CPU Ray cluster on 127.0.0.1 shared by the tests of this worker (`make test` runs two)."""
    import ray

    from raymmc.config import RayConfig
    from raymmc.raysession import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLUSTER_MARKER = "RAYMMC_TEST_CLUSTER"  # in a `ray start` cluster's environment: every one of its processes has it


def pids_with_env(key: str, value: str) -> list[int]:
    """The live processes (other than this one) with ``key=value`` in their environment, which every child
    process inherits: all of a Ray cluster's processes carry the environment of the process that started it
    (their command lines do not all say which cluster: some retitle themselves; and a daemonised `ray start`
    leaves no process tree to follow)."""
    tag = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if tag in (entry / "environ").read_bytes().split(b"\0"):  # a zombie's reads empty
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def cluster_pids(marker: str) -> list[int]:
    """The live processes of the `ray start` cluster started with ``{CLUSTER_MARKER: marker}`` in its environment."""
    return pids_with_env(CLUSTER_MARKER, marker)


def session_processes(*parts: str) -> list[int]:
    """The processes of this test worker's Ray session whose command line holds every one of ``parts`` (Ray's
    workers and actors retitle themselves ``ray::<class>``). Under pytest-xdist (`make test`) each worker runs
    its own session, whose processes inherit the worker's PYTEST_XDIST_WORKER: a test that signals Ray's
    processes leaves the other worker's alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    mine = None if worker is None else set(pids_with_env("PYTEST_XDIST_WORKER", worker))
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(pid) for pid, args in (line.split(None, 1) for line in out.splitlines()[1:])
            if all(p in args for p in parts) and (mine is None or int(pid) in mine)]


def stop_cluster(marker: str) -> None:
    """Stop that cluster only, by process id (`ray stop` would stop every Ray cluster on the machine, the test
    session's own included): SIGTERM, then SIGKILL, until none of its processes is left (or 30 s)."""
    deadline = time.monotonic() + 30
    sig = signal.SIGTERM
    while (pids := cluster_pids(marker)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3 if sig == signal.SIGTERM else 0.5)
        sig = signal.SIGKILL


def spawn_workers(worker, out_dir, nprocs: int = 2) -> list:
    """Run ``worker(rank, world, port, out_dir)`` in ``nprocs`` processes (a gloo group on a free port);
    return each rank's ``rank<r>.npz``."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(nprocs, _free_port(), str(out_dir)), nprocs=nprocs, join=True)
    return [np.load(f"{out_dir}/rank{r}.npz") for r in range(nprocs)]


def by_id(assignments: pa.Table) -> dict:
    """``{id: cluster}`` of an assignments table, each id once (compare runs by id: the row order of the
    files follows the prediction workers)."""
    ids = assignments.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was assigned twice"
    return dict(zip(ids, assignments.column("cluster").to_pylist()))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1, as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns (endpoint, bucket name)."""
    import uuid

    import boto3

    name = f"raymmc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return s3_server, name


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Downloaded data sources (Debian packages, wheels) cached once per test run, or in
    $RAYMMC_TEST_CACHE when set, so repeated local runs don't download again."""
    return os.environ.get("RAYMMC_TEST_CACHE") or str(tmp_path_factory.mktemp("raymmc-cache"))


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> str:
    """One feature cache for the runs of the whole session that do not test the cache itself: a run whose
    extraction config another run already used reads its features instead of extracting them again."""
    return str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def tux_items(cache_dir):
    from raymmc import datasets

    return datasets.collect("tuxpaint", cache_dir=cache_dir)


def png_bytes(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_archive(tmp_path_factory, tux_items):
    """A small real archive (3 tuxpaint classes, 60 items) in three shards plus an empty shard,
    with a corrupt image, a truncated image, a zero-byte image, a null caption, an empty caption,
    a corrupt image whose caption is also empty, a duplicated id and a row without id."""
    root = tmp_path_factory.mktemp("bad-archive")
    labels = np.array(tux_items.labels)
    keep = [i for c in ("animals", "food", "town") for i in np.flatnonzero(labels == c)[:20]]
    ids = [tux_items.ids[i] for i in keep]
    images = [tux_items.images[i] for i in keep]
    captions = [tux_items.captions[i] for i in keep]
    lab = [tux_items.labels[i] for i in keep]
    good_png = images[0]
    images[1] = b"this is not an image"  # corrupt; keeps its caption -> clustered on text
    images[2] = good_png[: len(good_png) // 2]  # truncated; keeps its caption
    images[3] = b""  # zero bytes; keeps its caption
    captions[4] = None  # null caption; keeps its image
    captions[5] = "   "  # empty caption; keeps its image
    images[6], captions[6] = b"\x89PNG garbage", ""  # nothing usable -> rejected
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                        ("label", pa.string())])
    table = pa.table({"id": ids, "image": images, "caption": captions, "label": lab}, schema=schema)
    pq.write_table(table.slice(0, 30), root / "part-00000.parquet")
    pq.write_table(table.slice(30), root / "part-00001.parquet")
    extra = pa.table({"id": [ids[10], None], "image": [images[11], images[12]], "caption": ["dup", "no id"],
                      "label": [lab[10], lab[12]]}, schema=schema)
    pq.write_table(extra, root / "part-00002.parquet")
    pq.write_table(table.slice(0, 0), root / "part-00003.parquet")  # an empty shard
    return {"uri": str(root), "ids": ids, "n_rows": len(ids) + 2, "duplicate": ids[10],
            "rejected_id": ids[6], "text_only": ids[1:4], "image_only": ids[4:6]}


# The test files in the order of their measured cost, longest first (`pytest -n 2 --durations=80`, 2-core
# machine, 2026-12-07). This is the order of a one-process run. Under `make test` (two pytest-xdist workers, --dist
# loadfile) xdist hands the files out by their number of tests, most first, so this order only breaks its ties:
# the many-test unit files run first and the few-test end-to-end files last. Taking this order literally instead
# (--no-loadscope-reorder: the long files first, side by side) was slower: 28:04 against 19:39 and 19:53 (one run
# each, 2026-12-07; user + system CPU time of the run, as `time` counts it, 17:38 against 10:48 and 11:47).
LONGEST_FIRST = ["test_train_ray.py", "test_jobs.py", "test_recluster.py", "test_columns.py", "test_s3_e2e.py",
                 "test_real_archive.py", "test_formats.py", "test_multinode.py", "test_faults.py",
                 "test_feature_cache.py", "test_hostile_input.py", "test_run_e2e.py", "test_assign.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
