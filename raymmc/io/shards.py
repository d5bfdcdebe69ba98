"""The shard contract: Parquet files with ``id`` (string, unique), ``image`` (binary, nullable),
``caption`` (string, nullable) and optional ``label`` (string). This module finds an archive's
files and checks each one's schema before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from raymmc.io.storage import StorageError, StorageOptions, in_threads, list_files, resolve

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("caption", pa.string()),
    pa.field("label", pa.string()),
])
REQUIRED = ("id",)
CONTENT = ("image", "caption")  # at least one must be present
OPTIONAL = ("label",)

_ACCEPTED = {
    "id": (pa.types.is_string, pa.types.is_large_string),
    "image": (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_null),
    "caption": (pa.types.is_string, pa.types.is_large_string, pa.types.is_null),
    "label": (pa.types.is_string, pa.types.is_large_string, pa.types.is_null, pa.types.is_integer),
}
_EXPECTED = {"id": "string", "image": "binary", "caption": "string", "label": "string or integer"}


class ShardError(ValueError):
    """An input file breaks the shard contract; the message names the file and the problem."""


@dataclass(frozen=True)
class Shard:
    uri: str
    path: str
    size: int
    rows: int
    columns: tuple[str, ...]  # contract columns present in this file
    mtime_ns: int | None = None
    # The archive format this file is read as (raymmc.io.formats); "shards" is the contract above.
    format: str = "shards"
    # What a format's reader needs besides the file, as (name, value) pairs: its companion files (a WebDataset
    # tar's sidecar Parquet, the .npy vectors beside clip-retrieval metadata), the column that holds the image,
    # the vectors' dimension. A tuple, not a dict: a Shard is frozen and travels to Ray workers.
    meta: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        return dict(self.meta).get(name, default)

    @property
    def key(self) -> str:
        """Identity of this file's content for caches: URI, size and modification time (and, for the other
        formats, the format and what its reader reads besides the file: companions carry their size and mtime)."""
        import hashlib

        ident = f"{self.uri}|{self.size}|{self.mtime_ns}"
        if self.format != "shards":  # (plain shards keep the key they always had: their caches stay valid)
            ident += f"|{self.format}|{sorted(self.meta)}"
        return hashlib.sha1(ident.encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        return asdict(self)


def check_schema(schema: pa.Schema, where: str) -> tuple[str, ...]:
    """Raise :class:`ShardError` unless ``schema`` meets the contract; return the contract columns present."""
    names = set(schema.names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ShardError(f"{where}: missing required column(s) {missing}; found {sorted(names)}")
    if not any(c in names for c in CONTENT):
        raise ShardError(f"{where}: needs an 'image' or a 'caption' column; found {sorted(names)}")
    present = []
    for col, checks in _ACCEPTED.items():
        if col not in names:
            continue
        tp = schema.field(col).type
        if not any(check(tp) for check in checks):
            raise ShardError(f"{where}: column {col!r} has type {tp}, expected {_EXPECTED[col]}")
        present.append(col)
    return tuple(present)


def discover(uri: str, options: StorageOptions | None = None) -> list[Shard]:
    """The Parquet files of an archive, each checked against the contract.

    Raises StorageError (missing/unreadable input) or ShardError (no files, bad schema,
    consistent columns, or no rows in any file).
    """
    entries = list_files(uri, ".parquet", options)
    if not entries:
        raise ShardError(f"{uri}: no .parquet files found")
    fs, _ = resolve(uri, options)

    def footer(e):
        try:
            meta = pq.read_metadata(e.path, filesystem=fs)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"{e.uri}: not a readable Parquet file ({exc})") from exc
        return Shard(e.uri, e.path, e.size, meta.num_rows, check_schema(schema, e.uri), e.mtime_ns)

    shards = in_threads(footer, entries)  # one footer read per file: many at once
    if sum(s.rows for s in shards) == 0:
        raise ShardError(f"{uri}: all {len(shards)} Parquet file(s) are empty (0 rows)")
    return shards


def read_shard(shard: Shard, options: StorageOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """One shard as an Arrow table with every contract column (absent ones filled with nulls)."""
    fs, _ = resolve(shard.uri, options)
    want = [c for c in (columns or SCHEMA.names) if c in shard.columns]
    try:
        table = pq.read_table(shard.path, filesystem=fs, columns=want)
    except (OSError, pa.ArrowException) as exc:
        raise read_error(shard.uri, fs, shard.path, exc) from exc
    return conform(table, columns or SCHEMA.names)


def read_error(uri: str, fs, path: str, exc: Exception, after_row: int | None = None) -> Exception:
    """What a failed read of an input file means: the file is gone (StorageError naming it), the store cannot be
    reached (StorageError), or the store answers and the bytes are bad (ShardError: a corrupt Parquet file)."""
    try:
        info = fs.get_file_info(path)
    except Exception:
        return StorageError(f"cannot read {uri}: {exc}")
    if info.type == pa.fs.FileType.NotFound:
        return StorageError(f"{uri}: disappeared after the archive was listed (deleted or moved during the run); "
                            "re-run to cluster the archive as it is now")
    where = "" if after_row is None else f" after row {after_row}"
    return ShardError(f"{uri}: unreadable Parquet data{where} ({exc})")


def conform(table: pa.Table, columns: list[str]) -> pa.Table:
    """Cast to the contract types and add missing columns as nulls."""
    arrays = []
    for name in columns:
        tp = SCHEMA.field(name).type
        if name in table.column_names:
            arrays.append(table.column(name).cast(tp))
        else:
            arrays.append(pa.nulls(table.num_rows, tp))
    return pa.table(arrays, names=list(columns))


def present_counts(shards: list[Shard], options: StorageOptions | None = None) -> dict[str, int]:
    """Rows, and rows with a non-null ``image`` / ``caption``, from Parquet statistics where the
    files carry them (reading only that column otherwise)."""
    def present(shard: Shard) -> dict[str, int]:
        fs, _ = resolve(shard.uri, options)
        meta = pq.read_metadata(shard.path, filesystem=fs)
        names = meta.schema.to_arrow_schema().names
        found = {"rows": shard.rows, "image": 0, "caption": 0}
        for col in ("image", "caption"):
            if col not in shard.columns:
                continue
            idx = names.index(col)
            nulls = 0
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(idx).statistics
                if stats is None or not stats.has_null_count:
                    nulls = pq.read_table(shard.path, filesystem=fs, columns=[col]).column(col).null_count
                    break
                nulls += stats.null_count
            found[col] = shard.rows - nulls
        return found

    parts = in_threads(present, shards)
    return {k: sum(p[k] for p in parts) for k in ("rows", "image", "caption")}


def parquet_batches(uri: str, fs, path: str, rows_per_batch: int,
                    columns: Callable[[pa.Schema], list[str]]) -> Iterator[tuple[int, pa.Table]]:
    """One Parquet input file's rows in batches, each with the row number of its first row; ``columns`` picks the
    columns to read from the file's schema. Any failure to open or read is raised as ``read_error`` says (the
    file gone, the store down, or bad bytes, with the row after which they start)."""
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:  # deleted since it was listed, the store is down, a bad footer
        raise read_error(uri, fs, path, exc) from exc
    batches = pf.iter_batches(batch_size=rows_per_batch, columns=columns(pf.schema_arrow))
    offset = 0
    while True:
        try:
            rb = next(batches, None)
        except (OSError, pa.ArrowException) as exc:  # a corrupt page behind a valid footer, or the store
            raise read_error(uri, fs, path, exc, after_row=offset) from exc
        if rb is None:
            return
        yield offset, pa.Table.from_batches([rb])
        offset += rb.num_rows


def read_file_batches(uri: str, path: str, storage: StorageOptions, rows_per_batch: int) -> Iterator[pa.Table]:
    """Yield one input file's rows in Arrow batches, with the file URI and row number of each."""
    fs, _ = resolve(uri, storage)
    wanted = ["id", "image", "caption", "label"]
    for offset, t in parquet_batches(uri, fs, path, rows_per_batch, lambda schema: [
            c for c in wanted if c in schema.names]):
        t = conform(t, wanted)
        n = t.num_rows
        t = t.append_column("source", pa.array([uri] * n, pa.string()))
        t = t.append_column("row", pa.array(np.arange(offset, offset + n), pa.int64()))
        yield t
