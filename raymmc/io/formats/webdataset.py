"""WebDataset tars (img2dataset's ``webdataset`` output among them): members ``{key}.jpg``, ``{key}.txt``,
``{key}.json``... grouped into one item per key.

The key rule is WebDataset's own (its ``base_plus_ext``): a member's key is its path up to the first dot of its
file name, the rest is its field, so ``dir/a.b.jpg`` is field ``b.jpg`` of key ``dir/a``; members with the same key
form one sample only while they are consecutive in the tar (a key that comes back later is a new sample, here a
duplicate id). The image is the first field that is an image extension (``jpg``, ``png``...), the caption the
``txt`` field (else the ``caption`` of the ``.json``), the label a ``cls`` field or ``archive.label_column`` of
the ``.json``. img2dataset writes only successful downloads into the tar, the failures into ``{shard}.parquet``
beside it: those rows come after the tar's samples, as rejects carrying img2dataset's error message.

Why not ``ray.data.read_webdataset``: its decoder fails the whole read on one corrupt member, and it gives no row
provenance; here a read task streams one tar (sequentially: one GET on an object store) and a corrupt member is
that item's note."""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Iterator

import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)

from raymmc.io.formats.img2dataset import count_failed, failed_rows
from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.formats.records import label_text, records, text_of
from raymmc.io.shards import Shard, ShardError
from raymmc.io.storage import StorageError, StorageOptions, in_threads, list_files, resolve

SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TEXT_FIELDS = ("txt", "text", "caption")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's member name -> (key, field): the split is at the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, field = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), (field if dot else "")


# What a tar that breaks off raises: tarfile's errors (truncated data, corrupt compression); OSError is storage.
BROKEN = (tarfile.TarError, EOFError, ValueError)


def samples(fileobj, where: str, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes], dict[str, str], str | None]]:
    """``(key, {field: bytes}, {field: why it was not read}, broken)`` in tar order, grouping consecutive members
    with the same key; a member over ``max_bytes`` is skipped unread. A tar that breaks off (truncated, corrupt)
    ends with the sample it broke in, ``broken`` saying why: the samples before it are kept, and they are the ones
    ``count_samples`` counted. A tar that breaks before its first sample is a ShardError."""
    key, fields, skipped, member = None, {}, {}, None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, field = split_key(m.name)
                if posixpath.basename(m.name).startswith(".") or not field:
                    continue  # hidden files and members without an extension are not sample fields
                if k != key:
                    if key is not None:
                        yield key, fields, skipped, None
                    key, fields, skipped = k, {}, {}
                member = m.name
                if m.size > max_bytes:  # tarfile skips its data as it streams on: never held in memory
                    skipped[field.lower()] = (f"member {m.name} is {m.size} bytes, over archive.max_member_bytes="
                                              f"{max_bytes}; not read")
                    continue
                fields[field.lower()] = tf.extractfile(m).read()
    except OSError as exc:
        raise StorageError(f"cannot read {where}: {exc}") from exc
    except BROKEN as exc:
        if key is None:
            raise ShardError(f"{where}: unreadable tar data ({exc})") from exc
        yield key, fields, skipped, f"tar data breaks off at member {member} ({exc}): the tar is truncated or corrupt"
        return
    if key is not None:
        yield key, fields, skipped, None


def count_samples(uri: str, path: str, fs) -> int:
    """Samples in a tar, from its member headers. An uncompressed tar is walked header to header (tarfile seeks
    past each member's data: 512 bytes read per member, not the archive); a compressed one has to be streamed.
    A tar that breaks off counts the samples up to the break, the one it broke in included (``samples`` yields
    the same ones, the last rejected)."""
    n, key = 0, None
    plain = path.endswith(".tar")
    try:
        # compression=None: tarfile decompresses, so a corrupt .tar.gz is a tarfile error (a break), not an OSError
        # from Arrow's decompressor that reads like a storage failure (the same in ``read``)
        f = fs.open_input_file(path) if plain else fs.open_input_stream(path, compression=None)
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:" if plain else "r|*")
            for m in tf:
                if not m.isfile() or posixpath.basename(m.name).startswith("."):
                    continue
                k, field = split_key(m.name)
                if field and k != key:
                    n, key = n + 1, k
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from exc
        except BROKEN as exc:
            if n == 0:
                raise ShardError(f"{uri}: unreadable tar data ({exc})") from exc
    return n


def sidecar_of(path: str) -> str:
    for s in SUFFIXES:
        if path.endswith(s):
            return path[: -len(s)] + ".parquet"
    return path + ".parquet"


def discover(uri: str, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    fs, _ = resolve(uri, options)
    entries = sorted((e for s in SUFFIXES for e in list_files(uri, s, options)), key=lambda e: e.path)
    # Counting reads headers only, and waits on storage: threads overlap the reads of many tars.
    counts = in_threads(lambda e: count_samples(e.uri, e.path, fs), entries)
    shards = []
    for e, rows in zip(entries, counts):
        meta = {"label_column": cfg.label_column, "max_member_bytes": str(cfg.max_member_bytes)}
        side = sidecar_of(e.path)
        info = fs.get_file_info(side)
        if info.type == pa.fs.FileType.File:
            failed = count_failed(side, fs)
            if failed is not None:
                rows += failed
                meta.update(sidecar=side, sidecar_mtime=str(info.mtime_ns), sidecar_size=str(info.size))
        shards.append(Shard(e.uri, e.path, e.size, rows, ("id", "image", "caption", "label"), e.mtime_ns,
                            format="webdataset", meta=tuple(sorted((k, v) for k, v in meta.items() if v is not None))))
    return shards


def to_record(key: str, fields: dict[str, bytes], label_column: str | None, skipped: dict[str, str] | None = None,
              broken: str | None = None) -> tuple:
    """One sample -> (id, image, caption, label, image_issue, caption_issue, reject). ``skipped``: fields not read
    (why, per field); ``broken``: the tar broke off in this sample, which is rejected for it."""
    if broken:
        return key, None, None, None, None, None, broken
    skipped = skipped or {}
    # the field named for an image type, else one that ends with it (WebDataset's "left.jpg" of "a.left.jpg")
    image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
    if image is None:
        image = next((v for f, v in fields.items() if f.rsplit(".", 1)[-1] in IMAGE_FIELDS), None)
    image_issue = None
    too_big = next((why for f, why in skipped.items() if f.rsplit(".", 1)[-1] in IMAGE_FIELDS), None)
    if image is None and too_big:
        image_issue = f"image: {too_big}"
    elif image is None and fields:
        image_issue = f"image: no image member (fields: {', '.join(sorted(fields))})"
    meta, caption_issue = {}, None
    too_big = next((why for f, why in skipped.items() if f in TEXT_FIELDS or f == "json"), None)
    if too_big:
        caption_issue = f"caption: {too_big}"
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
            meta = meta if isinstance(meta, dict) else {}
        except ValueError:
            caption_issue = "json: not valid JSON; ignored"
    raw = next((fields[f] for f in TEXT_FIELDS if f in fields), None)
    caption, note = text_of(raw, "caption")
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    label = None
    if "cls" in fields:
        label = text_of(fields["cls"], "cls")[0].strip()
    elif label_column and label_column in meta:
        label = label_text(meta[label_column])
    return key, image, caption, label, image_issue, note or caption_issue, None


def read(shard: Shard, storage: StorageOptions | None, rows_per_batch: int) -> Iterator[pa.Table]:
    fs, _ = resolve(shard.uri, storage)
    label_column = shard.get("label_column")
    max_bytes = int(shard.get("max_member_bytes") or ArchiveConfig.max_member_bytes)
    row, buf = 0, []

    def flush() -> pa.Table:
        cols = list(zip(*buf))
        return records(cols[0], cols[1], cols[2], cols[3], shard.uri, row - len(buf),
                       notes={"image_issue": cols[4], "caption_issue": cols[5], "reject": cols[6]})

    try:
        stream = fs.open_input_stream(shard.path, compression=None)
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"cannot read {shard.uri}: {exc}") from exc
    with stream:
        for key, fields, skipped, broken in samples(stream, shard.uri, max_bytes):
            buf.append(to_record(key, fields, label_column, skipped, broken))
            row += 1
            if len(buf) >= rows_per_batch:
                yield flush()
                buf = []
    if buf:
        yield flush()
    if shard.get("sidecar"):
        failed = failed_rows(shard.get("sidecar"), fs, shard.uri, row)
        if failed is not None and failed.num_rows:
            yield failed


def is_webdataset(uri: str, options: StorageOptions | None) -> int:
    """How many tars ``uri`` holds."""
    return sum(len(list_files(uri, s, options)) for s in SUFFIXES)

