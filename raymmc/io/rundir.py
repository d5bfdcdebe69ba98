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


class RunDir:
    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = uri
        self.options = options
        self.stage_seconds: dict[str, float] = {}

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def create(self) -> "RunDir":
        storage.makedirs(self.uri, self.options)
        return self

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
