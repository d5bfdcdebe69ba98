"""img2dataset's Parquet output: one row per URL tried, with ``key``, ``caption``, the image bytes in ``jpg``
(or ``png`` / ``webp``, per its ``encode_format``), ``status`` and ``error_message``. A row whose status is not
``success`` is a reject whose reason carries img2dataset's own error message."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.formats.records import label_text, records
from raymmc.io.shards import Shard, ShardError, parquet_batches
from raymmc.io.storage import StorageOptions, in_threads, list_files, resolve

IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
ID_COLUMNS = ("key", "id", "image_path", "url")
CAPTION_COLUMNS = ("caption", "txt", "text")


def pick(names: list[str], configured: str | None, candidates: tuple[str, ...], what: str, where: str,
         required: bool = True) -> str | None:
    """The column to read: the configured one (which must exist), or the first candidate present."""
    if configured not in (None, "auto"):
        if configured not in names:
            raise ShardError(f"{where}: no column {configured!r} (the configured {what}); found {sorted(names)}")
        return configured
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise ShardError(f"{where}: no {what} column (looked for {', '.join(candidates)}); found {sorted(names)}")
    return found


def discover(uri: str, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    fs, _ = resolve(uri, options)
    return in_threads(lambda e: _shard(e, fs, cfg), list_files(uri, ".parquet", options))  # a footer read each


def _shard(e, fs, cfg: ArchiveConfig) -> Shard:
    """One file's footer -> its Shard."""
    try:
        meta = pq.read_metadata(e.path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{e.uri}: not a readable Parquet file ({exc})") from exc
    names = meta.schema.to_arrow_schema().names
    id_col = pick(names, cfg.id_column, ID_COLUMNS, "id", e.uri)
    image_col = pick(names, cfg.image_column, IMAGE_COLUMNS, "image", e.uri, required=False)
    caption_col = pick(names, cfg.caption_column, CAPTION_COLUMNS, "caption", e.uri, required=False)
    if image_col is None and caption_col is None:
        raise ShardError(f"{e.uri}: needs an image column ({', '.join(IMAGE_COLUMNS)}) or a caption column "
                         f"({', '.join(CAPTION_COLUMNS)}); found {sorted(names)}")
    label_col = pick(names, cfg.label_column, (), "label", e.uri, required=False) if cfg.label_column else None
    columns = tuple(c for c, present in (("id", True), ("image", image_col), ("caption", caption_col),
                                         ("label", label_col)) if present)
    m = {"id": id_col, "image": image_col, "caption": caption_col, "label": label_col,
         "status": "status" if "status" in names else None,
         "error": "error_message" if "error_message" in names else None}
    return Shard(e.uri, e.path, e.size, meta.num_rows, columns, e.mtime_ns, format="img2dataset",
                 meta=tuple((k, v) for k, v in sorted(m.items()) if v is not None))


def read(shard: Shard, storage: StorageOptions | None, rows_per_batch: int) -> Iterator[pa.Table]:
    """The file's rows as record batches (``raymmc.io.formats.records``)."""
    fs, _ = resolve(shard.uri, storage)
    cols = {k: shard.get(k) for k in ("id", "image", "caption", "label", "status", "error")}
    wanted = sorted({c for c in cols.values() if c})
    for offset, t in parquet_batches(shard.uri, fs, shard.path, rows_per_batch, lambda _: wanted):
        yield convert(t, cols, shard.uri, offset)


def _values(t: pa.Table, col: str | None, binary: bool = False) -> list:
    if col is None:
        return [None] * t.num_rows
    c = t.column(col)
    if binary or pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
        # bytes, decoded by us: a string column written by another tool may hold invalid UTF-8
        return c.cast(pa.binary()).to_pylist() if not pa.types.is_null(c.type) else [None] * t.num_rows
    return c.to_pylist()


def convert(t: pa.Table, cols: dict[str, str | None], source: str, first_row: int) -> pa.Table:
    """img2dataset rows -> a record batch: failed rows become rejects with img2dataset's status and message."""
    from raymmc.io.formats.records import text_of

    n = t.num_rows
    ids = [None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
           for v in _values(t, cols["id"])]
    images = _values(t, cols["image"], binary=True)
    captions, caption_issue = [], []
    for raw in _values(t, cols["caption"]):
        text, note = text_of(raw, "caption") if isinstance(raw, bytes) else (label_text(raw), None)
        captions.append(text)
        caption_issue.append(note)
    labels = [label_text(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
              for v in _values(t, cols["label"])]
    status = _values(t, cols["status"])
    errors = _values(t, cols["error"])
    reject: list[str | None] = [None] * n
    for i in range(n):
        st = status[i].decode("utf-8", "replace") if isinstance(status[i], bytes) else status[i]
        if st is not None and st != "success":
            err = errors[i].decode("utf-8", "replace") if isinstance(errors[i], bytes) else errors[i]
            reject[i] = f"img2dataset status {st}: {err or 'no error message'}"
            images[i], captions[i], caption_issue[i] = None, None, None
    return records(ids, images, captions, labels, source, first_row,
                   notes={"reject": reject, "caption_issue": caption_issue})


def failed_rows(path: str, fs, source: str, first_row: int, id_column: str = "key") -> pa.Table | None:
    """The failed rows of an img2dataset sidecar Parquet (WebDataset output keeps only successes in the tar) as
    rejects, or None when the sidecar has no status column."""
    names = pq.read_schema(path, filesystem=fs).names
    if "status" not in names or id_column not in names:
        return None
    want = [c for c in (id_column, "status", "error_message") if c in names]
    t = pq.read_table(path, filesystem=fs, columns=want)
    t = t.filter(pc.not_equal(t.column("status"), "success"))
    return convert(t, {"id": id_column, "image": None, "caption": None, "label": None, "status": "status",
                       "error": "error_message" if "error_message" in names else None}, source, first_row)


def count_failed(path: str, fs, id_column: str = "key") -> int | None:
    """How many rows ``failed_rows`` yields for this sidecar (None: no status column), from the status column
    alone: discovery counts every tar's rows on the driver, and needs no ids, messages or per-row lists for it."""
    names = pq.read_schema(path, filesystem=fs).names
    if "status" not in names or id_column not in names:
        return None
    status = pq.read_table(path, filesystem=fs, columns=["status"]).column("status")
    return int(pc.sum(pc.not_equal(status, "success")).as_py() or 0)  # null status: not a failure (see convert)
