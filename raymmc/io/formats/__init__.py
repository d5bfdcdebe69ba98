"""Archive formats: raymmc's own shards, img2dataset Parquet, WebDataset tars, COCO caption JSON and
precomputed embeddings. Each format module finds its files (``discover`` -> one :class:`Shard` per read task,
with its item count) and reads one file as record batches (``read``, see ``records``); everything downstream
(decode, encoders, feature cache, accounting) is the same for all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from raymmc.io.formats.options import FORMATS, ArchiveConfig
from raymmc.io.shards import Shard, ShardError
from raymmc.io.storage import StorageOptions

__all__ = ["ArchiveConfig", "FORMATS", "Input", "detect", "discover_input", "read_batches", "present_counts"]


@dataclass(frozen=True)
class Input:
    format: str
    why: str  # how the format was chosen (the manifest's input_format)
    shards: list[Shard]

    def to_dict(self) -> dict:
        views = [v for v in ("image", "text") if any(f"{v}_feat" in s.columns for s in self.shards)]
        return {"format": self.format, "why": self.why, "precomputed": views}


def detect(uri: str, options: StorageOptions | None = None) -> tuple[str, str]:
    """The format of the archive at ``uri`` and why, from its file names and (for Parquet and JSON) the first
    file's schema / structure."""
    import posixpath

    import pyarrow.parquet as pq

    from raymmc.io.formats import coco, embeddings, webdataset
    from raymmc.io.storage import list_files, read_bytes, resolve

    everything = list_files(uri, "", options)
    tars = [e for e in everything if e.path.endswith(webdataset.SUFFIXES)]
    if tars:
        return "webdataset", f"{len(tars)} tar file(s) (e.g. {posixpath.basename(tars[0].path)})"
    npy_dirs = sorted({posixpath.basename(posixpath.dirname(e.path)) for e in everything if e.path.endswith(".npy")}
                      & set(embeddings.NPY_DIRS))
    if npy_dirs:
        return "embeddings", f".npy vectors in {', '.join(d + '/' for d in npy_dirs)} (clip-retrieval's layout)"
    parquet = [e for e in everything if e.path.endswith(".parquet")]
    jsons = [e for e in everything if e.path.endswith(".json") and not e.path.endswith("_stats.json")]
    if not parquet and jsons:
        import json

        for e in jsons:
            try:
                doc = json.loads(read_bytes(e.uri, options))
            except ValueError:
                continue
            if coco.is_coco(doc):
                return "coco", f"{posixpath.basename(e.path)} has COCO's 'images' and captioned 'annotations'"
    if not parquet:
        raise ShardError(f"{uri}: no archive files found (.parquet, .tar, COCO .json, .npy embeddings)")
    fs, _ = resolve(uri, options)
    try:
        schema = pq.read_schema(parquet[0].path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{parquet[0].uri}: not a readable Parquet file ({exc})") from exc
    name = posixpath.basename(parquet[0].path)
    vectors = [n for n in schema.names if embeddings.is_vector_type(schema.field(n).type)]
    if vectors:
        return "embeddings", f"{name} has float vector column(s) {vectors}"
    # img2dataset's own columns: its status, or its key with the image (an `id` may be there too: img2dataset run
    # with save_additional_columns=["id"] is still img2dataset, its image in `jpg`, not raymmc's `image`)
    names = set(schema.names)
    marks = [c for c in ("key", "status", "error_message", "jpg", "png", "webp") if c in names]
    if ({"status", "error_message"} <= names or ("key" in names and names & {"jpg", "png", "webp"})
            or ("key" in names and "id" not in names)):
        return "img2dataset", f"{name} has img2dataset's column(s) {', '.join(repr(c) for c in marks)}"
    return "shards", f"{name} has raymmc's shard columns ('id' with 'image' / 'caption')"


def discover_input(uri: str, options: StorageOptions | None = None, cfg: ArchiveConfig | None = None) -> Input:
    """The archive's files as read tasks, in the configured format (or the detected one)."""
    from raymmc.io import shards as shard_format
    from raymmc.io.formats import coco, embeddings, img2dataset, webdataset

    cfg = cfg or ArchiveConfig()
    if cfg.format == "auto":
        fmt, why = detect(uri, options)
    else:
        fmt, why = cfg.format, "set by archive.format (--input-format)"
    if fmt == "shards":
        found = shard_format.discover(uri, options)
    else:
        found = {"img2dataset": img2dataset.discover, "webdataset": webdataset.discover, "coco": coco.discover,
                 "embeddings": embeddings.discover}[fmt](uri, options, cfg)
    if not found:
        raise ShardError(f"{uri}: no {fmt} files found")
    if sum(s.rows for s in found) == 0:
        raise ShardError(f"{uri}: all {len(found)} {fmt} file(s) are empty (0 items)")
    views = {tuple(c for c in s.columns if c.endswith("_feat")) for s in found}
    if len(views) > 1:
        raise ShardError(f"{uri}: files differ in their precomputed views ({sorted(views)}); every file needs the "
                         "same image / text vectors")
    return Input(fmt, why, found)


def read_batches(shard: Shard, storage: StorageOptions | None, rows_per_batch: int) -> Iterator[pa.Table]:
    """One input file's items as record batches (``raymmc.io.formats.records``), whatever its format."""
    from raymmc.io.formats import coco, embeddings, img2dataset, webdataset

    if shard.format == "shards":
        from raymmc.io.shards import read_file_batches

        return read_file_batches(shard.uri, shard.path, storage, rows_per_batch)
    return {"img2dataset": img2dataset.read, "webdataset": webdataset.read, "coco": coco.read,
            "embeddings": embeddings.read}[shard.format](shard, storage, rows_per_batch)


def present_counts(shards: list[Shard], options: StorageOptions | None = None) -> dict[str, int]:
    """Items, and items with an image / a caption (for ``--algorithm auto``): exact for shards (Parquet
    statistics); for the other formats, from which views the files hold (without reading the items)."""
    from raymmc.io.shards import present_counts as shard_counts

    plain = [s for s in shards if s.format == "shards"]
    counts = shard_counts(plain, options) if plain else {"rows": 0, "image": 0, "caption": 0}
    for s in shards:
        if s.format == "shards":
            continue
        counts["rows"] += s.rows
        counts["image"] += s.rows if ("image" in s.columns or "image_feat" in s.columns) else 0
        counts["caption"] += s.rows if ("caption" in s.columns or "text_feat" in s.columns) else 0
    return counts
