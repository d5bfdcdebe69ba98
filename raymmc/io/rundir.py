"""The run directory, local or in an object store:

    manifest.json      config, versions, seed, inputs (with sizes), counts, time per stage
    features.json      where the features of this run are (the per-file feature cache)
    assignments/       id, cluster, confidence, has_image, has_text, note (Parquet)
    rejects/           id, reason, source, row (Parquet)
    metrics.json       cluster sizes; acc, nmi, ari, purity, f_score when labels exist
    model/             the fitted clustering state (for `raymmc assign`)
    report/            index.html (the cluster report, self-contained) and summary.png
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raymmc.io import storage
from raymmc.io.storage import StorageOptions

PACKAGES = ("raymmc", "ray", "torch", "torchvision", "faiss-cpu", "faiss-gpu", "gensim", "numpy", "pyarrow",
            "scikit-learn", "scipy", "sentence-transformers", "s3fs", "pillow")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunLocationError(ValueError):
    """A run name or output URI that would put the run directory somewhere else than one level under the output."""


def check_run_location(output: str, run_name: str | None) -> None:
    """Refuse a run name that is not one plain path segment (``../x``, ``a/b``, ``.``) and an output with ``..``
    segments: a run must land exactly at ``<output>/<run_name>``, never beside or above it (a shared bucket's
    other prefixes belong to someone else)."""
    if run_name is not None and (not _RUN_NAME.fullmatch(run_name) or run_name.strip(".") == ""):
        raise RunLocationError(f"run name {run_name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with "
                               "a letter or digit (it becomes one directory under the output)")
    path = output.split("://", 1)[1] if "://" in output else output
    if ".." in re.split(r"[/\\]", path):
        raise RunLocationError(f"output {output!r}: '..' segments are not allowed (write the prefix itself)")


CLAIM_FILE = "_RUN.json"  # written once, exclusively, by the run that owns the folder
NAME_TRIES = 100  # default names tried (name, name-2, ... name-100) when runs start in the same second


class RunFolderTaken(RunLocationError):
    """The run folder already belongs to another run."""


def open_run(output: str, run_name: str | None, default_name: str, options: StorageOptions | None = None, *,
             command: str, resuming: bool = False) -> "RunDir":
    """The run folder ``<output>/<name>``, claimed for this run: a run never writes into another's folder (two
    jobs given the same ``--run-name``, or started in the same second with default names, would otherwise mix
    their outputs). A given name that is taken is an error naming its owner; a default name that is taken gets a
    suffix (``-2``, ``-3``, ...). ``resuming``: the folder of the interrupted run, which it already owns."""
    check_run_location(output, run_name)
    if resuming:
        return RunDir(storage.join(output, run_name), options)
    names = [run_name] if run_name else [default_name] + [f"{default_name}-{i}" for i in range(2, NAME_TRIES + 1)]
    for name in names:
        rundir = RunDir(storage.join(output, name), options)
        owner = rundir.claim(command)
        if owner is None:
            return rundir
    if run_name:
        raise RunFolderTaken(f"{rundir.uri} already holds a run ({owner}); choose another --run-name, delete that "
                             "folder if its run failed and is not wanted, or continue an interrupted `raymmc run` "
                             f"with `raymmc run --resume {rundir.uri}`")
    raise RunFolderTaken(f"{NAME_TRIES} run folders named {default_name}[-N] under {output} are taken; "
                         "pass --run-name")


class RunDir:
    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = uri
        self.options = options
        self.stage_seconds: dict[str, float] = {}

    @property
    def name(self) -> str:
        """The run's name: the folder's last segment."""
        return self.uri.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def create(self) -> "RunDir":
        storage.makedirs(self.uri, self.options)
        return self

    def claim(self, command: str) -> str | None:
        """Make this folder this run's (see :func:`open_run`): None if it now is, else a description of the run
        that holds it. A folder written before claims existed counts as held if it has a run's config or manifest.
        """
        import datetime as _dt
        import json
        import os
        import socket

        if self.exists("config.json") or self.exists("manifest.json"):
            return "an earlier run's config.json / manifest.json is there"
        claim = {"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if storage.create_exclusive(self.path(CLAIM_FILE), json.dumps(claim).encode(), self.options):
            self.create()
            return None
        try:
            held = self.read_json(CLAIM_FILE)
            return f"`raymmc {held.get('command')}` started {held.get('started')} on {held.get('host')}"
        except Exception:  # unreadable: still taken
            return f"its {CLAIM_FILE} is there"

    def write_table(self, name: str, table: pa.Table, part: str = "part-00000.parquet") -> str:
        """Write ``table`` as ``<run>/<name>/<part>``."""
        uri = self.path(name, part)
        storage.write_parquet(uri, table, self.options)
        return uri

    def write_parquet(self, name: str, table: pa.Table) -> str:
        """Write ``table`` as the single Parquet file ``<run>/<name>``."""
        uri = self.path(name)
        storage.write_parquet(uri, table, self.options)
        return uri

    def read_table(self, name: str) -> pa.Table:
        fs, _ = storage.resolve(self.uri, self.options)
        files = storage.list_files(self.path(name), ".parquet", self.options)
        return pa.concat_tables([pq.read_table(f.path, filesystem=fs) for f in files])

    def write_json(self, name: str, obj: Any) -> str:
        uri = self.path(name)
        storage.write_json(uri, obj, self.options)
        return uri

    def read_json(self, name: str) -> Any:
        return storage.read_json(self.path(name), self.options)

    def write_bytes(self, name: str, data: bytes) -> str:
        uri = self.path(name)
        storage.write_bytes(uri, data, self.options)
        return uri

    def read_bytes(self, name: str) -> bytes:
        return storage.read_bytes(self.path(name), self.options)

    def exists(self, name: str) -> bool:
        return storage.exists(self.path(name), self.options)


class StageTimer:
    """``with timer("extract"): ...`` records wall seconds per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.seconds[self.name] = round(self.timer.seconds.get(self.name, 0.0)
                                              + time.perf_counter() - self.t0, 3)
