"""The Ray Data feature-extraction job.

shards -> read (a task per file, streaming row groups, with file/row provenance)
       -> decode + clean (CPU tasks) -> image-encoder actors (GPU where there is one)
       -> text-encoder actors -> feature Parquet.

Every input row comes out exactly once, with ``has_image`` / ``has_text`` flags and a note
saying why a modality was dropped; deciding what is rejected happens downstream.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from raymmc.features.decode import DecodeConfig, clean_caption, decode_image
from raymmc.features.text import FITTED, TextEncoderConfig, make_text_encoder
from raymmc.io.formats import read_batches
from raymmc.io.shards import Shard, ShardError, read_file_batches  # noqa: F401  (re-exported)
from raymmc.io.storage import StorageError, StorageOptions, resolve, write_bytes
from raymmc.io.storage import join as join_uri

FEATURE_COLUMNS = ("id", "source", "row", "label", "caption", "has_image", "has_text", "image_note",
                   "caption_note", "image_hash", "image_feat", "text_feat", "pixels")
# The Ray node each encoder ran on: carried to the write task, reported in the manifest, not written.
NODE_COLUMNS = ("image_node", "text_node")


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


@dataclass
class PixelConfig:
    """Raw pixels kept for end-to-end models (MMDC): the image resized (shorter side) and
    centre-cropped to ``size``, grayscale when ``channels`` is 1."""

    size: int = 28
    channels: int = 1


def pack_pixels(batch: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
    """(n, H, W, 3) uint8 -> (n, C*H*W) uint8 in channel-first order."""
    px = batch.pop("pixels")
    if channels == 1:
        # ITU-R 601 luma, as PIL's convert("L").
        px = (px[..., :1] * 0.299 + px[..., 1:2] * 0.587 + px[..., 2:3] * 0.114).round().astype(np.uint8)
    batch["pixels"] = np.ascontiguousarray(px.transpose(0, 3, 1, 2)).reshape(len(px), -1)
    return batch


@dataclass
class ExtractStats:
    rows: int = 0
    with_image: int = 0
    with_text: int = 0
    image_dropped: int = 0
    caption_dropped: int = 0
    seconds: float = 0.0
    files_cached: int = 0  # read from a cache: this run's, or (``files_reused`` of them) the model run's
    files_extracted: int = 0
    files_reused: int = 0
    cache: str = ""
    reused_cache: str | None = None
    text_encoder: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    # Per Ray Data stage of this run's job: name, rows, seconds from its first task's start to its last's end.
    stages: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # Ray nodes whose encoders and writers ran (this run's files)


_STAGE_LINE = re.compile(r"^Operator \d+ (?P<name>.+?): \d+ tasks executed, \d+ blocks produced in (?P<s>[\d.]+)s",
                         re.MULTILINE)


def stage_times(ray_stats: str, rows: int) -> list[dict[str, Any]]:
    """Stages and their durations from Ray Data's stats text (every stage here is one row in, one row out).
    Empty where the text does not have the expected form (the figures are a report, never an input)."""
    out = []
    for m in _STAGE_LINE.finditer(ray_stats):
        seconds = float(m.group("s"))
        out.append({"stage": m.group("name"), "rows": rows, "seconds": seconds,
                    "items_per_s": rows / seconds if seconds > 0 else None})
    return out


# --- stage functions (plain, unit-testable) -----------------------------------------------------

class ShardDatasource(Datasource):
    """One Ray Data read task per input file of any archive format (``raymmc.io.formats``: a Parquet file, a tar,
    a COCO annotation file), streaming it. (``from_items`` + a read ``map_batches`` hands all files to one task as
    a single bundle, so files would be read and decoded one after another.)"""

    def __init__(self, shards: list[Shard], storage: StorageOptions, rows_per_batch: int):
        self.shards, self.storage, self.rows_per_batch = shards, storage, rows_per_batch

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.size for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_batches, s, self.storage, self.rows_per_batch),
                         BlockMetadata(num_rows=s.rows, size_bytes=s.size, exec_stats=None, input_files=(s.uri,)),
                         per_task_row_limit=per_task_row_limit)
                for s in self.shards]


def decode_batch(batch: pa.Table, cfg: DecodeConfig) -> dict[str, np.ndarray]:
    """Decode images to uint8 HxWx3 and clean captions; note why anything was dropped.

    ``batch`` is a record batch of any archive format (``raymmc.io.formats.records``): a ``reject`` reason makes
    the item unusable with that reason, ``image_issue`` / ``caption_issue`` notes from the reader are kept, and
    precomputed ``image_feat`` / ``text_feat`` vectors (null where unusable) stand for that view: no pixels are
    decoded for a precomputed image view. ``image_hash`` fingerprints each decodable image's bytes (duplicate
    images under different ids)."""
    n = batch.num_rows
    names = batch.column_names
    size = cfg.image_size
    pre_image = "image_feat" in names
    pixels = None if pre_image else np.zeros((n, size, size, 3), dtype=np.uint8)
    has_image = np.zeros(n, dtype=bool)
    image_note = np.full(n, "", dtype=object)
    image_hash = np.full(n, None, dtype=object)
    captions = np.full(n, "", dtype=object)
    has_text = np.zeros(n, dtype=bool)
    caption_note = np.full(n, "", dtype=object)
    if not pre_image:
        for i, data in enumerate(batch.column("image").to_pylist()):
            arr, reason = decode_image(data, cfg)
            if arr is not None:
                pixels[i], has_image[i] = arr, True
                image_hash[i] = hashlib.blake2b(data, digest_size=16).hexdigest()
            elif reason:
                image_note[i] = reason
    for i, raw in enumerate(_raw_bytes(batch, "caption")):
        text, reason = clean_caption(raw, cfg)
        if text is not None:
            captions[i], has_text[i] = text, True
        if reason:
            caption_note[i] = reason
    out = {
        "id": np.array([_text(v) for v in _raw_bytes(batch, "id")], dtype=object),
        "source": np.array(batch.column("source").to_pylist(), dtype=object),
        "row": batch.column("row").to_numpy(),
        "label": np.array([_text(v) for v in _raw_bytes(batch, "label")], dtype=object),
        "caption": captions, "image_hash": image_hash,
    }
    for feat, flag in (("image_feat", has_image), ("text_feat", has_text)):
        if feat in names:  # precomputed: the view is usable where the reader left a vector
            col = batch.column(feat).combine_chunks()
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            dense = np.zeros((n, col.type.list_size), dtype=np.float32)
            dense[valid] = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).reshape(
                -1, col.type.list_size)
            out[feat] = dense
            flag[:] = valid
    for issue, notes in (("image_issue", image_note), ("caption_issue", caption_note)):
        if issue in names:
            for i, v in enumerate(batch.column(issue).to_pylist()):
                if v:
                    notes[i] = "; ".join(x for x in (v, notes[i]) if x)
    if "reject" in names:
        for i, reason in enumerate(batch.column("reject").to_pylist()):
            if reason:  # unusable at the source: both views carry the reason (the accounting names it once)
                has_image[i] = has_text[i] = False
                image_note[i] = caption_note[i] = reason
    out.update(has_text=has_text, caption_note=caption_note, has_image=has_image, image_note=image_note)
    if pixels is not None:
        out["pixels"] = pixels
    return out


def _raw_bytes(batch: pa.Table, column: str) -> list[bytes | None]:
    """A string column's values as bytes. Parquet written by other tools can hold invalid UTF-8 in a string
    column, and ``to_pylist`` on it raises: read the bytes and decode them ourselves."""
    return batch.column(column).cast(pa.binary()).to_pylist()


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def drop_non_finite(batch: dict[str, np.ndarray], feats: np.ndarray, view: str) -> None:
    """Drop the ``view`` (``image`` or ``caption``) of rows whose encoder output is not finite: one NaN would
    poison every centroid and loss it touches. The row keeps its other view, with a note saying why."""
    flag, note = ("has_image", "image_note") if view == "image" else ("has_text", "caption_note")
    mask = batch[flag].astype(bool)
    bad = mask & ~np.isfinite(feats).all(axis=1)
    if bad.any():
        feats[bad] = 0.0
        notes = batch[note].astype(object)  # Ray may hand over a fixed-width '<U' array
        notes[bad] = f"{view}: encoder output not finite (NaN or inf)"
        batch[flag], batch[note] = mask & ~bad, notes


class ImageEmbedder:
    """Ray Data actor: holds one CNN, encodes the rows that have an image."""

    def __init__(self, model: str, weights: str, half: bool, threads: int = 1, device: str = "auto",
                 storage: StorageOptions | None = None):
        import torch

        # Imported here, not at module level: the decode and write tasks unpickle this module's functions,
        # and a task worker that never runs a model should not pay torch's import time.
        from raymmc.features.image import ImageEncoder

        torch.set_num_threads(max(1, threads))  # the CPUs Ray reserved for this actor, no more
        self.encoder = ImageEncoder(model, weights, device=device, half=half, storage=storage)  # s3:// weights too

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        mask = batch["has_image"].astype(bool)
        feats = np.zeros((len(mask), self.encoder.dim), dtype=np.float32)
        if mask.any():
            feats[mask] = self.encoder(pixels[mask])
            drop_non_finite(batch, feats, "image")
        batch["image_feat"] = feats
        batch["image_node"] = np.full(len(mask), node_id(), dtype=object)
        return batch


class TextEmbedder:
    """Ray Data actor: encodes captions with an encoder fitted on the driver (shipped via the object store)."""

    def __init__(self, encoder_ref: Any, threads: int = 1):
        import sys

        import ray

        self.encoder = ray.get(encoder_ref) if isinstance(encoder_ref, ray.ObjectRef) else encoder_ref
        load = getattr(self.encoder, "load", None)
        if load is not None:  # pretrained models: load at actor start, while the image actors start too
            load()
        if "torch" in sys.modules:  # a torch-based encoder: no more threads than the CPUs Ray reserved
            sys.modules["torch"].set_num_threads(max(1, threads))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = batch["has_text"].astype(bool)
        feats = np.zeros((len(mask), self.encoder.dim), dtype=np.float32)
        if mask.any():
            feats[mask] = self.encoder.encode([str(c) for c in batch["caption"][mask]])
            drop_non_finite(batch, feats, "caption")
        batch["text_feat"] = feats
        batch["text_node"] = np.full(len(mask), node_id(), dtype=object)
        return batch


def to_arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    """Feature batch -> Arrow with fixed-size-list vectors (readable by plain pyarrow, no Ray types)."""
    cols: dict[str, pa.Array] = {}
    for name in FEATURE_COLUMNS + NODE_COLUMNS:
        if name not in batch:
            continue
        value = batch[name]
        if name.endswith("_feat"):
            v = np.ascontiguousarray(value, dtype=np.float32)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        elif name == "pixels":
            v = np.ascontiguousarray(value, dtype=np.uint8)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        elif name in ("has_image", "has_text"):
            cols[name] = pa.array(value.astype(bool))
        elif name == "row":
            cols[name] = pa.array(value.astype(np.int64))
        else:
            cols[name] = pa.array(optional_strings(value), pa.string())
    return pa.table(cols)


def optional_strings(values: Any) -> list[str | None]:
    """A string column of a NumPy batch, with its nulls. Between stages Ray Data turns an object column that is
    all None (the ``label`` of an unlabelled archive, the ``id`` of a batch of rows without ids) into float NaN:
    anything that is not a string was a null."""
    return [v if isinstance(v, str) else None for v in values]


def feature_matrix(table: pa.Table, column: str, dtype: type = np.float32) -> np.ndarray:
    """A fixed-size-list feature column as an (n, d) array."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, d)


# --- the feature cache ---------------------------------------------------------------------------
#
# <cache>/<fingerprint>/<file key>/<attempt>/rows-<first>-<last>.parquet
# <cache>/<fingerprint>/<file key>/_DONE.json   {"attempt": ..., "rows": ..., "uri": ..., "size": ...}
# fingerprint: the extractor's config (and, for text encoders fitted on the archive, the archive);
# file key: the input file's URI, size and mtime; attempt: one per run that extracted the file. A run writes
# only into its own attempt folders, so runs sharing a cache never write into, clear or read each other's
# half-done work; _DONE.json is written once a file's rows are counted, and names the folder later runs read.
# A finished file is never extracted again; an attempt that wrote every row of its file without marking it (a
# killed run) is adopted; a partial one is ignored, and deleted once nothing has written to it for
# ``extract.stale_attempt_hours``.

FEATURE_FORMAT = 3  # (2: image_hash; 3: attempt folders) bump when the feature table or cache layout changes
DONE_FILE = "_DONE.json"
# Per-file helper tasks spread over the nodes, as Ray Data's own tasks do; and never captured by the placement
# group of a Tune trial that starts a run (its bundle has no room for them: "resource shape" error).
SPREAD = "SPREAD"
TEXT_ENCODER_FILE = "text_encoder.safetensors"  # a text encoder fitted on the archive, beside its features
PROBE_FILES = 256  # input files probed (or marked done) per Ray task: each task lists one folder per file


def fingerprint(extract_cfg: Any, shards: list[Shard], seed: int, modalities: frozenset[str],
                text_identity: str | None = None) -> str:
    """Identity of everything that determines the features of one file. ``text_identity``
    names a text encoder fitted elsewhere (``raymmc assign`` reuses a run's)."""
    import dataclasses
    import hashlib
    import json

    text = dataclasses.asdict(extract_cfg.text) if "text" in modalities else None
    if text and extract_cfg.text.model in ("doc2vec", "tfidf"):
        # Fitted on the whole archive: a grown archive gives every caption a new vector.
        text["archive"] = text_identity or sorted(s.key for s in shards)
        text["seed"] = seed
    ident = {
        "format": FEATURE_FORMAT,
        "image": dataclasses.asdict(extract_cfg.image) if "image" in modalities else None,
        "pixels": dataclasses.asdict(extract_cfg.pixels) if "pixels" in modalities else None,
        "decode": dataclasses.asdict(extract_cfg.decode),
        "text": text,
    }
    ident["image"] and ident["image"].pop("batch_size")
    text and text.pop("batch_size")
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_feature_batch(batch: pa.Table, root: str, keys: dict[str, str], storage: StorageOptions) -> pa.Table:
    """Write a batch into the cache, one file per contiguous row range of each input file."""
    from raymmc.io.storage import join, write_parquet

    written = {"key": [], "first": [], "last": []}
    nodes = sorted({n for c in NODE_COLUMNS if c in batch.column_names for n in batch.column(c).unique().to_pylist()
                    if n} | {node_id()})
    batch = batch.drop_columns([c for c in NODE_COLUMNS if c in batch.column_names])
    sources = batch.column("source").to_numpy(zero_copy_only=False)
    rows = batch.column("row").to_numpy()
    for src in np.unique(sources):
        idx = np.flatnonzero(sources == src)
        idx = idx[np.argsort(rows[idx])]
        breaks = np.flatnonzero(np.diff(rows[idx]) != 1) + 1
        for run in np.split(idx, breaks):
            first, last = int(rows[run[0]]), int(rows[run[-1]])
            # Atomic: a run killed mid-write must not leave a file whose name claims rows it does not hold.
            write_parquet(join(root, keys[src], f"rows-{first:012d}-{last:012d}.parquet"), batch.take(pa.array(run)),
                          storage)
            written["key"].append(keys[src])
            written["first"].append(first)
            written["last"].append(last)
    return pa.table({"key": pa.array(written["key"], pa.string()), "first": pa.array(written["first"], pa.int64()),
                     "last": pa.array(written["last"], pa.int64()),
                     "nodes": pa.array([",".join(nodes)] * len(written["key"]), pa.string())})


def new_attempt() -> str:
    """A name for this run's attempt folders: sortable by start time, unique across concurrent runs."""
    import uuid

    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


ROWS_FILE = re.compile(r"rows-(\d+)-(\d+)\.parquet")
LEGACY = ""  # the "attempt" of a cache written before attempt folders (FEATURE_FORMAT 2): files under the key itself


def _key_listing(fs: pafs.FileSystem, key_path: str) -> tuple[dict[str, list[pafs.FileInfo]], bool]:
    """The attempt folders under one file key (name -> the files in it, dot-files included; LEGACY -> the feature
    files directly under the key) and whether ``_DONE.json`` is there; one listing."""
    infos = fs.get_file_info(pafs.FileSelector(key_path, recursive=True, allow_not_found=True))
    attempts: dict[str, list[pafs.FileInfo]] = {}
    done = False
    prefix = key_path.rstrip("/") + "/"
    for i in infos:
        if not i.path.startswith(prefix):
            continue
        head, _, rest = i.path[len(prefix):].partition("/")
        if rest:
            attempts.setdefault(head, [])
            if i.type == pafs.FileType.File:
                attempts[head].append(i)
        elif i.type == pafs.FileType.Directory:
            attempts.setdefault(head, [])
        elif head == DONE_FILE:
            done = True
        elif ROWS_FILE.fullmatch(head):
            attempts.setdefault(LEGACY, []).append(i)
    return attempts, done


def _covers(files: list[pafs.FileInfo], rows: int) -> bool:
    """Whether feature files named ``rows-<first>-<last>.parquet`` cover rows 0..rows-1 exactly once (other names
    are ignored)."""
    import posixpath

    ranges = sorted((int(m[1]), int(m[2])) for m in (ROWS_FILE.fullmatch(posixpath.basename(f.path)) for f in files)
                    if m)
    expected = 0
    for first, last in ranges:
        if first != expected:
            return False
        expected = last + 1
    return rows > 0 and expected == rows


def _newest(files: list[pafs.FileInfo]) -> float:
    """The last write into a folder; infinity where the store does not say (such a folder is never stale)."""
    if not files or any(f.mtime is None for f in files):
        return float("inf")
    return max(f.mtime.timestamp() for f in files)


def _read_mark(fs: pafs.FileSystem, path: str) -> dict:
    """A ``_DONE.json``; {} where it is unreadable or not a mark (a cache anyone can write to is not trusted)."""
    import json

    try:
        with fs.open_input_stream(path) as f:
            mark = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def _folder(root: str, key: str, attempt: str) -> str:
    return join_uri(root, key, attempt) if attempt != LEGACY else join_uri(root, key)


def probe_files(root: str, shards: list[Shard], storage: StorageOptions | None, stale_s: float | None = None,
                now: float | None = None) -> list[tuple[str | None, bool]]:
    """For each of ``shards``, the attempt folder under ``root`` that holds all its rows and whether it is marked:
    the one its ``_DONE.json`` names (marked), else one that wrote every row without marking it (a killed run's);
    None where there is none. A marked file of a cache written before attempt folders is read where it is.
    ``stale_s``: also delete the *partial* attempt folders nothing has written to for that long (a killed run's;
    a complete folder is never deleted: a run may be reading it); None: delete nothing, as for a cache only read.
    One filesystem and one listing per file: run by a Ray task per group of files (:func:`_in_groups`)."""
    import posixpath

    fs, base = resolve(root, storage)
    now = time.time() if now is None else now
    found: list[tuple[str | None, bool]] = []
    for shard in shards:
        key_path = posixpath.join(base, shard.key)
        attempts, done = _key_listing(fs, key_path)
        chosen, marked = None, False
        if done:
            mark = _read_mark(fs, posixpath.join(key_path, DONE_FILE))
            named = mark.get("attempt", LEGACY if "rows" in mark else None)  # (a mark without one: the old layout)
            if mark.get("rows") == shard.rows and isinstance(named, str) and named in attempts and (
                    named != LEGACY or _covers(attempts[LEGACY], shard.rows)):
                chosen, marked = named, True
        if chosen is None:
            chosen = next((a for a in sorted(attempts) if a != LEGACY and _covers(attempts[a], shard.rows)), None)
        if stale_s is not None:
            for a, files in attempts.items():
                if a in (chosen, LEGACY) or _covers(files, shard.rows):
                    continue
                if now - _newest(files or [fs.get_file_info(posixpath.join(key_path, a))]) > stale_s:
                    fs.delete_dir(posixpath.join(key_path, a))
        found.append((_folder(root, shard.key, chosen) if chosen is not None else None, marked))
    return found


def mark_done(root: str, shards: list[Shard], attempt_dirs: list[str], storage: StorageOptions | None) -> list[str]:
    """Mark each file done with a ``_DONE.json`` naming its attempt folder (after its rows were counted), created
    exclusively. Where another run sharing the cache marked the file first, its folder is the one every later run
    reads, and this run switches to it too (both hold every row). Returns, per file, the folder to read."""
    import json
    import posixpath

    from raymmc.io.storage import create_exclusive

    fs, base = resolve(root, storage)
    chosen = []
    for shard, d in zip(shards, attempt_dirs):
        attempt = d.rstrip("/").rsplit("/", 1)[1]
        mark = json.dumps({"attempt": attempt, "uri": shard.uri, "rows": shard.rows, "size": shard.size}).encode()
        uri = join_uri(root, shard.key, DONE_FILE)
        if create_exclusive(uri, mark, storage):
            chosen.append(d)
            continue
        other = _read_mark(fs, posixpath.join(base, shard.key, DONE_FILE))
        named = other.get("attempt")
        if (isinstance(named, str) and named and other.get("rows") == shard.rows
                and fs.get_file_info(posixpath.join(base, shard.key, named)).type == pafs.FileType.Directory):
            chosen.append(join_uri(root, shard.key, named))  # another run's mark, on a folder that is there
        else:  # a mark naming a folder that is gone, or not a mark: this run's complete folder replaces it
            write_bytes(uri, mark, storage)
            chosen.append(d)
    return chosen


def _in_groups(fn: Any, root: str, shards: list[Shard], extra: list | None, storage: StorageOptions | None,
               cpus_per_task: float, **kwargs: Any) -> list:
    """``fn(root, shards[i:j], [extra[i:j]], storage, **kwargs)`` over groups of PROBE_FILES files, as SPREAD Ray
    tasks where Ray runs (the listings and small writes of 100k files are not made by the driver), concatenated.
    A single group runs in the caller: a few hundred calls cost less than starting a task's worker process."""
    import ray

    groups = range(0, len(shards), PROBE_FILES)
    args = [(root, shards[i:i + PROBE_FILES], *([extra[i:i + PROBE_FILES]] if extra is not None else []), storage)
            for i in groups]
    if ray.is_initialized() and len(args) > 1:
        task = ray.remote(num_cpus=cpus_per_task, scheduling_strategy=SPREAD)(fn)
        parts = ray.get([task.remote(*a, **kwargs) for a in args])
    else:
        parts = [fn(*a, **kwargs) for a in args]
    return [x for p in parts for x in p]


# --- the job ------------------------------------------------------------------------------------

def fit_text_encoder(shards: list[Shard], cfg: TextEncoderConfig, decode: DecodeConfig, seed: int,
                     storage: StorageOptions, cpus_per_task: float = 0.25):
    """Fit the text encoder on a bounded seeded sample of the archive's own captions
    (:func:`caption_sample`)."""
    if cfg.model == "none":
        return None
    encoder = make_text_encoder(cfg, seed)
    if cfg.model == "minilm":
        return encoder  # pretrained
    texts = caption_sample(shards, decode, cfg.fit_sample, seed, storage, cpus_per_task)
    if len(texts) < 2:
        return None
    return encoder.fit(texts)


def saved_text_encoder(root: str, model: str, storage: StorageOptions | None):
    """The text encoder fitted on the archive (TF-IDF, Doc2Vec) saved beside the features in ``root``; None for a
    pretrained model or where none was saved."""
    from raymmc.features.text import text_encoder_from_state
    from raymmc.io import safestate
    from raymmc.io.storage import exists, read_bytes

    uri = join_uri(root, TEXT_ENCODER_FILE)
    if model not in FITTED or not exists(uri, storage):
        return None
    return text_encoder_from_state(safestate.loads(read_bytes(uri, storage), where=uri))


def _archive_text_encoder(shards: list[Shard], root: str, extract_cfg: Any, seed: int, storage: StorageOptions):
    """The text encoder for the files still to extract: the one saved in ``root`` where a run made features there
    before (a resumed or a concurrent run must encode its captions as the cached files were), else fitted now and
    saved (arrays and plain values in safetensors, never a pickle: whoever can write to the cache must not run code
    on the cluster)."""
    from raymmc.io import safestate

    encoder = saved_text_encoder(root, extract_cfg.text.model, storage)
    if encoder is not None:
        return encoder
    encoder = fit_text_encoder(shards, extract_cfg.text, extract_cfg.decode, seed, storage, extract_cfg.cpus_per_task)
    if encoder is not None and extract_cfg.text.model in FITTED:  # (MiniLM is pretrained: nothing to save)
        # `raymmc assign` encodes new captions with it; identical for every run with this fingerprint (seeded)
        write_bytes(join_uri(root, TEXT_ENCODER_FILE), safestate.dumps(encoder.to_state()), storage)
    return encoder


def caption_sample(shards: list[Shard], decode: DecodeConfig, size: int, seed: int, storage: StorageOptions,
                   cpus_per_task: float = 0.25) -> list[str]:
    """At most ``size`` cleaned, non-empty captions: those of lowest keyed-hash priority (of the item id,
    or file URI and row where the id is empty), in priority order. Each file is read by its own Ray task
    (in-process where Ray is not running), which returns only its captions under the priority threshold,
    so the caller holds O(size) captions, never the archive's."""
    import ray

    from raymmc.hashing import keep_fraction

    with_captions = [s for s in shards if "caption" in s.columns and s.rows > 0]
    fraction = keep_fraction(size, sum(s.rows for s in with_captions))
    if ray.is_initialized():
        task = ray.remote(num_cpus=cpus_per_task, scheduling_strategy=SPREAD)(_shard_captions)
        parts = ray.get([task.remote(s, decode, seed, fraction, storage) for s in with_captions])
    else:
        parts = [_shard_captions(s, decode, seed, fraction, storage) for s in with_captions]
    if not parts:
        return []
    priority = np.concatenate([p for p, _ in parts])
    texts = [t for _, ts in parts for t in ts]
    return [texts[i] for i in np.argsort(priority, kind="stable")[:size]]


def _shard_captions(shard: Shard, decode: DecodeConfig, seed: int, fraction: float,
                    storage: StorageOptions) -> tuple[np.ndarray, list[str]]:
    from raymmc.hashing import keyed_priority, under
    from raymmc.io.shards import read_shard

    if shard.format == "shards":
        table = read_shard(shard, storage, ["id", "caption"])
    else:  # another format: its reader yields the same columns (its captions only are kept here)
        table = pa.concat_tables([b.select(["id", "caption"]) for b in read_batches(shard, storage, CAPTION_ROWS)])
    ids = _raw_bytes(table, "id")  # bytes: an id need not be valid UTF-8 to key a sample
    keys = [i if i else f"{shard.uri}#{row}" for row, i in enumerate(ids)]
    priority = keyed_priority(keys, seed)
    keep = np.flatnonzero(under(priority, fraction))
    raw = _raw_bytes(table.take(pa.array(keep, pa.int64())), "caption")
    texts, kept = [], []
    for j, value in zip(keep, raw):
        text, _ = clean_caption(value, decode)
        if text:
            texts.append(text)
            kept.append(j)
    return priority[np.array(kept, dtype=np.int64)], texts


CAPTION_ROWS = 1024  # rows per record batch when another format's captions are sampled for a fitted text encoder


def precomputed_views(shards: list[Shard]) -> frozenset[str]:
    """The views (``image``, ``text``) whose vectors the archive already has: no encoder runs for them."""
    return frozenset(v for v in ("image", "text") if any(f"{v}_feat" in s.columns for s in shards))


def run_extraction(shards: list[Shard], cache_uri: str, *, extract_cfg: Any, seed: int,
                   storage: StorageOptions, has_gpu: bool,
                   modalities: frozenset[str] = frozenset({"image", "text"}),
                   log=print, text_encoder=None, text_identity: str | None = None,
                   cache_root: str | None = None, reuse_root: str | None = None) -> tuple[list[str], ExtractStats]:
    """Extract features of ``shards`` into the cache under ``cache_uri``, skipping files already
    done. Returns the feature directories (one per non-empty input file) and the stats.
    Encoders of modalities not in ``modalities`` are skipped. ``text_encoder``: an encoder
    already fitted (identified by ``text_identity``) instead of fitting one on these shards.
    ``cache_root``: continue that cache directory (a re-clustering: the previous run's features, made with
    the same config and with ``text_encoder``, the one fitted there) instead of the fingerprint's.
    ``reuse_root``: another cache made by these same encoders (`raymmc assign` passes its model run's): a file
    complete there is read from there, only read, never extracted again (an archive re-assigned as it grows
    encodes its new files only)."""
    from raymmc.io.storage import join, scheme_of

    t0 = time.time()
    stats = ExtractStats()
    root = cache_root or join(cache_uri, fingerprint(extract_cfg, shards, seed, modalities, text_identity))
    if reuse_root is not None and scheme_of(reuse_root) != scheme_of(root):
        # the accounting pass reads every feature file through one filesystem
        log(f"extract: not reading the model run's features in {reuse_root} (another storage than {root})")
        reuse_root = None
    live = [s for s in shards if s.rows > 0]
    task_cpus = extract_cfg.cpus_per_task
    stale_s = extract_cfg.stale_attempt_hours * 3600
    probed = _in_groups(probe_files, root, live, None, storage, task_cpus, stale_s=stale_s)
    found = {s.key: d for s, (d, _) in zip(live, probed)}
    adopted = [s for s, (d, marked) in zip(live, probed) if d is not None and not marked]
    missing = [s for s in live if found[s.key] is None]
    if reuse_root is not None and missing:  # only read there: nothing of that cache is deleted or marked
        found.update({s.key: d for s, (d, _) in zip(missing, _in_groups(probe_files, reuse_root, missing, None,
                                                                         storage, task_cpus)) if d is not None})
    reused = {s.key for s in missing if found[s.key] is not None}
    todo = [s for s in missing if found[s.key] is None]
    attempt = new_attempt()  # this run's folder for each file it extracts (other runs may be writing theirs)
    found.update({s.key: join(root, s.key, attempt) for s in todo})
    stats.files_cached = len(live) - len(todo)
    stats.files_reused, stats.reused_cache = len(reused), reuse_root if reused else None
    stats.files_extracted = len(todo)

    img_cfg = extract_cfg.image
    pre = precomputed_views(shards)
    use_image = img_cfg.model != "none" and "image" in modalities and "image" not in pre
    if "text" not in modalities or not todo or "text" in pre:  # precomputed text vectors: no encoder
        text_encoder = None
    elif text_encoder is None:
        text_encoder = _archive_text_encoder(shards, root, extract_cfg, seed, storage)

    if todo:
        ray_stats, stats.nodes = _stream(todo, root, attempt, extract_cfg, storage, has_gpu, modalities, use_image,
                                         text_encoder)
        stats.stages = stage_times(ray_stats, sum(s.rows for s in todo))

    dirs = [found[s.key] for s in live]
    dims = feature_dims(dirs, storage)
    if "image_feat" in dims:
        stats.image_encoder = ({"model": "precomputed", "dim": dims["image_feat"]} if "image" in pre else
                               {"model": img_cfg.model, "weights": img_cfg.weights, "dim": dims["image_feat"]})
    if "text_feat" in dims:
        stats.text_encoder = ({"model": "precomputed", "dim": dims["text_feat"]} if "text" in pre else
                              {"model": extract_cfg.text.model, "dim": dims["text_feat"]})
    counts = feature_counts(dirs, storage, extract_cfg.cpus_per_task, expected=[s.rows for s in live])
    # Marked only now, with every row counted: a mark certifies a complete folder. Adopted attempts (a killed run's,
    # complete but unmarked) are marked too.
    unmarked = adopted + todo
    found.update(zip((s.key for s in unmarked),
                     _in_groups(mark_done, root, unmarked, [found[s.key] for s in unmarked], storage, task_cpus)))
    dirs = [found[s.key] for s in live]
    stats.rows, stats.with_image, stats.with_text = counts["rows"], counts["with_image"], counts["with_text"]
    stats.image_dropped, stats.caption_dropped = counts["image_dropped"], counts["caption_dropped"]
    stats.seconds = time.time() - t0
    stats.cache = root
    for st in stats.stages:
        rate = f"{st['items_per_s']:.1f} items/s" if st["items_per_s"] else "-"
        log(f"extract stage {st['stage']}: {st['rows']} rows in {st['seconds']:.1f}s ({rate})")
    reuse = f", {stats.files_reused} of them from {reuse_root}" if reused else ""
    log(f"extract: {stats.rows} rows from {len(dirs)} file(s) ({stats.files_cached} cached{reuse}, "
        f"{stats.files_extracted} extracted) in {stats.seconds:.1f}s; "
        f"{stats.image_dropped} image(s) and {stats.caption_dropped} caption(s) unusable")
    return dirs, stats


def feature_dims(dirs: list[str], storage: StorageOptions | None) -> dict[str, int]:
    """``{"image_feat": d, "text_feat": d}`` (the columns present) from one feature file's schema."""
    from raymmc.io.storage import list_files

    for d in dirs:
        files = list_files(d, ".parquet", storage)
        if files:
            fs, _ = resolve(d, storage)
            schema = pq.read_schema(files[0].path, filesystem=fs)
            return {c: schema.field(c).type.list_size for c in ("image_feat", "text_feat") if c in schema.names}
    return {}


COUNT_KEYS = ("rows", "with_image", "with_text", "image_dropped", "caption_dropped")


def feature_counts(dirs: list[str], storage: StorageOptions | None, cpus_per_task: float = 0.25,
                   expected: list[int] | None = None) -> dict[str, int]:
    """Rows, rows with an image / a caption, and dropped images / captions over the feature files, counted by
    one Ray task per file (in-process without Ray): the caller receives five integers per file. ``expected``: each
    folder's input rows; a folder holding another number is an error naming it (rows are never lost silently)."""
    import ray

    if ray.is_initialized():
        task = ray.remote(num_cpus=cpus_per_task, scheduling_strategy=SPREAD)(_dir_counts)
        parts = ray.get([task.remote(d, storage) for d in dirs])
    else:
        parts = [_dir_counts(d, storage) for d in dirs]
    for d, part, rows in zip(dirs, parts, expected or []):
        if part["rows"] != rows:
            # a feature file deleted (or written by something other than raymmc) after the folder was finished
            raise RuntimeError(f"the feature cache {d} holds {part['rows']} rows of its input file's {rows}: "
                               "its files were changed after it was written. Delete that folder and re-run "
                               "(only that file is extracted again)")
    return {k: int(sum(p[k] for p in parts)) for k in COUNT_KEYS}


def _dir_counts(d: str, storage: StorageOptions | None) -> dict[str, int]:
    from raymmc.io.storage import list_files

    fs, _ = resolve(d, storage)
    cols = ["has_image", "has_text", "image_note", "caption_note"]
    tables = [pq.read_table(f.path, filesystem=fs, columns=cols) for f in list_files(d, ".parquet", storage)]
    if not tables:  # a folder that lost its files: zero rows, which the caller's check names
        return {k: 0 for k in COUNT_KEYS}
    t = pa.concat_tables(tables)
    has_image = t.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
    has_text = t.column("has_text").to_numpy(zero_copy_only=False).astype(bool)
    # A note on a row that kept the modality (a truncated caption) is not a drop.
    image_note = np.array([bool(v) for v in t.column("image_note").to_pylist()], dtype=bool)
    caption_note = np.array([bool(v) for v in t.column("caption_note").to_pylist()], dtype=bool)
    return {"rows": t.num_rows, "with_image": int(has_image.sum()), "with_text": int(has_text.sum()),
            "image_dropped": int((image_note & ~has_image).sum()),
            "caption_dropped": int((caption_note & ~has_text).sum())}


def _stream(todo: list[Shard], root: str, attempt: str, extract_cfg: Any, storage: StorageOptions, has_gpu: bool,
            modalities: frozenset[str], use_image: bool, text_encoder: Any) -> tuple[str, list[str]]:
    """The Ray Data job over the files in ``todo``, writing their features into this run's ``attempt`` folders
    under ``root``; returns Ray Data's stats of the job and the nodes it ran on."""
    import dataclasses

    import ray

    img_cfg = extract_cfg.image
    decode_cfg = extract_cfg.decode
    if "pixels" in modalities:
        decode_cfg = dataclasses.replace(decode_cfg, image_size=extract_cfg.pixels.size,
                                         resize=extract_cfg.pixels.size)
    # About one decode batch per block. Ray Data's default cap (128 MiB) holds ~850 decoded 224x224 images: a
    # whole input file would land in one block, and the encoder would wait for the entire file to be decoded
    # before its first batch, so decoding and encoding would never overlap. The floor keeps blocks of small
    # images (MMDC's 28x28 pixels) from shrinking to a few rows each.
    ctx = ray.data.DataContext.get_current().copy()
    ctx.target_max_block_size = max(extract_cfg.decode_batch_size * decode_cfg.image_size ** 2 * 3, 4 * 2**20)
    if extract_cfg.buffer_mb is not None:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=extract_cfg.buffer_mb * 2**20)
    with ray.data.DataContext.current(ctx):
        gpus = extract_cfg.gpus_per_actor if extract_cfg.gpus_per_actor is not None else (1 if has_gpu else 0)
        pool = ray.data.ActorPoolStrategy(min_size=extract_cfg.min_actors, max_size=extract_cfg.max_actors)
        task_cpus = extract_cfg.cpus_per_task
        ds = ray.data.read_datasource(ShardDatasource(todo, storage, extract_cfg.decode_batch_size),
                                      override_num_blocks=len(todo), num_cpus=task_cpus)
        # batch_size=None: decode each block the read yields (decode_batch_size rows), so that Ray Data fuses
        # read and decode into one task per file (it does not fuse a read into a map that re-batches).
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None,
                            num_cpus=task_cpus, fn_kwargs={"cfg": decode_cfg})
        if "pixels" in modalities:
            ds = ds.map_batches(pack_pixels, batch_format="numpy", num_cpus=task_cpus,
                                fn_kwargs={"channels": extract_cfg.pixels.channels})
        elif use_image:
            ds = ds.map_batches(ImageEmbedder, batch_size=img_cfg.batch_size, compute=pool, num_gpus=gpus,
                                num_cpus=extract_cfg.cpus_per_actor,
                                fn_constructor_kwargs={"model": img_cfg.model, "weights": img_cfg.weights,
                                                       "half": img_cfg.half_precision, "storage": storage,
                                                       "threads": int(extract_cfg.cpus_per_actor)})
        else:
            ds = ds.map_batches(_drop_pixels, batch_format="numpy", num_cpus=task_cpus)
        if text_encoder is not None:
            ds = ds.map_batches(TextEmbedder, batch_size=extract_cfg.text.batch_size, compute=pool,
                                num_cpus=extract_cfg.text_cpus_per_actor, num_gpus=extract_cfg.text_gpus_per_actor,
                                fn_constructor_kwargs={"encoder_ref": ray.put(text_encoder),
                                                       "threads": int(extract_cfg.text_cpus_per_actor)})
        ds = ds.map_batches(to_arrow, batch_format="numpy", num_cpus=task_cpus)
        ds = ds.map_batches(write_feature_batch, batch_format="pyarrow", num_cpus=task_cpus,
                            fn_kwargs={"root": root, "keys": {s.uri: f"{s.key}/{attempt}" for s in todo},
                                       "storage": storage})
        try:
            done = ds.materialize()
        except Exception as exc:
            err = _input_error(exc, todo, storage)
            if err is exc:
                raise
            raise err from exc
        # one row per written file: reduced by Ray Data's aggregation, so the driver receives the few distinct values
        nodes = sorted({n for v in done.unique("nodes") for n in v.split(",")})
        return done.stats(), nodes


def _input_error(exc: Exception, todo: list[Shard], storage: StorageOptions) -> Exception:
    """The error to report for a failed extraction job: our own ShardError / StorageError where a task raised
    one (Ray wraps it in its task and UDF errors), else a note of the input files that changed since they were
    listed, else Ray's error as it is."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) in (ShardError, StorageError):  # the original, not Ray's RayTaskError(ShardError) wrapper
            return type(e)(str(e.args[0]) if e.args else str(e))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    changed = []
    for s in todo:
        fs, path = resolve(s.uri, storage)
        try:
            info = fs.get_file_info(path)
        except Exception:  # the store is down: nothing to say about the file
            continue
        if info.type == pafs.FileType.NotFound:
            changed.append(f"{s.uri} (deleted)")
        elif info.size != s.size:
            changed.append(f"{s.uri} (size {s.size} -> {info.size})")
    if changed:
        return ShardError("input file(s) changed after the archive was listed: " + ", ".join(changed)
                          + "; re-run to cluster the archive as it is now")
    return exc


def _drop_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch.pop("pixels", None)
    return batch


def load_features(dirs: list[str], storage: StorageOptions | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """The feature Parquet of ``dirs`` as one table, ordered by (source, row)."""
    from raymmc.io.storage import list_files

    tables = []
    for d in dirs:
        fs, _ = resolve(d, storage)
        for f in list_files(d, ".parquet", storage):
            names = pq.read_schema(f.path, filesystem=fs).names
            cols = None if columns is None else [c for c in dict.fromkeys(["source", "row", *columns]) if c in names]
            tables.append(pq.read_table(f.path, filesystem=fs, columns=cols))
    if not tables:
        raise ValueError("no features to load")
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by([("source", "ascending"), ("row", "ascending")])
