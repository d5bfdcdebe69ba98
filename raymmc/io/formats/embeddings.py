"""Archives that already have embeddings, in either of two layouts:

- clip-retrieval's: ``metadata/metadata_<n>.parquet`` (``caption``, ``image_path`` or ``key``/``url``...) with
  ``img_emb/img_emb_<n>.npy`` and/or ``text_emb/text_emb_<n>.npy`` beside it, row i of each .npy being row i of
  the metadata with the same ``<n>``;
- Parquet with a list (or fixed-size-list) column of float vectors per view, beside the id, caption, label.

The vectors become the item's ``image_feat`` / ``text_feat`` directly: no encoder runs for a precomputed view.
A vector of the wrong dimension or with NaN / inf is dropped with a note; an item with no usable view left is
rejected for it (the rule for every other unusable view). ``.npy`` files are read safely: the header is parsed
with NumPy's format reader, object arrays (which would need unpickling) are refused, and each read task reads only
its own rows' bytes (one ranged read per batch): nothing loads a whole file."""

from __future__ import annotations

import posixpath
import re
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymmc.io.formats.img2dataset import CAPTION_COLUMNS, ID_COLUMNS, pick
from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.formats.records import label_text, records, text_of
from raymmc.io.shards import Shard, ShardError, parquet_batches
from raymmc.io.storage import StorageOptions, in_threads, list_files, resolve

NPY_DIRS = {"img_emb": "image", "text_emb": "text"}
# A vector column whose name has one of these is a text vector (clip-retrieval's txt_emb, caption_emb...).
TEXT_HINTS = ("text", "txt", "caption")
_NUMBER = re.compile(r"(\d+)\.(?:npy|parquet)$")


def is_vector_type(tp: pa.DataType) -> bool:
    return ((pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp))
            and pa.types.is_floating(tp.value_type))


def vector_columns(schema: pa.Schema, cfg: ArchiveConfig, where: str) -> dict[str, str]:
    """``{"image": column, "text": column}`` for the views whose vectors this Parquet schema holds."""
    out = {}
    auto = [n for n in schema.names if is_vector_type(schema.field(n).type)]
    for view, configured in (("image", cfg.image_vectors), ("text", cfg.text_vectors)):
        if configured == "none":
            continue
        if configured != "auto":
            if configured not in schema.names or not is_vector_type(schema.field(configured).type):
                raise ShardError(f"{where}: no float list column {configured!r} (archive.{view}_vectors)")
            out[view] = configured
            continue
        found = [n for n in auto if any(h in n.lower() for h in TEXT_HINTS) == (view == "text")]
        if len(found) > 1:
            raise ShardError(f"{where}: several {view} vector columns {found}; choose one with archive.{view}_vectors")
        if found:
            out[view] = found[0]
    return out


def npy_header(fs, path: str, where: str) -> tuple[int, int, np.dtype, int]:
    """``(rows, dim, dtype, data offset)`` of a 2-D float .npy, from its header alone."""
    try:
        with fs.open_input_file(path) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise ShardError(f"{where}: not a readable .npy file ({exc})") from exc
    if dtype.hasobject or dtype.kind != "f":
        raise ShardError(f"{where}: .npy of dtype {dtype}; embeddings must be float (object arrays are refused: "
                         "reading them means unpickling)")
    if len(shape) != 2 or fortran:
        raise ShardError(f"{where}: expected a C-order (rows, dim) array, found shape {shape}"
                         f"{' in Fortran order' if fortran else ''}")
    return int(shape[0]), int(shape[1]), dtype, offset


def _first_dim(fs, path: str, column: str) -> int | None:
    """The length of the first non-null vector of ``column``, reading as little of the file as possible."""
    pf = pq.ParquetFile(path, filesystem=fs)
    tp = pf.schema_arrow.field(column).type
    if pa.types.is_fixed_size_list(tp):
        return tp.list_size
    for rb in pf.iter_batches(batch_size=256, columns=[column]):
        for v in rb.column(0):
            if v.is_valid:
                return len(v.values)
    return None


def discover(uri: str, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    npys = list_files(uri, ".npy", options)
    if any(posixpath.basename(posixpath.dirname(e.path)) in NPY_DIRS for e in npys):
        return _discover_npy(uri, npys, options, cfg)
    return _discover_parquet(uri, options, cfg)


def _metadata_columns(names: list[str], cfg: ArchiveConfig, where: str) -> dict[str, str]:
    m = {"id": pick(names, cfg.id_column, ID_COLUMNS, "id", where)}
    caption = pick(names, cfg.caption_column, CAPTION_COLUMNS, "caption", where, required=False)
    if caption:
        m["caption"] = caption
    if cfg.label_column:
        m["label"] = pick(names, cfg.label_column, (), "label", where)
    if "image" in names:  # image bytes beside text vectors: the image view is encoded as usual
        m["image"] = "image"
    return m


def _discover_npy(uri: str, npys, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    fs, _ = resolve(uri, options)
    # paired by (output folder, number): two clip-retrieval outputs under one input both have a metadata_0
    by_number: dict[tuple[str, str], dict[str, object]] = {}
    for e in npys:
        view = NPY_DIRS.get(posixpath.basename(posixpath.dirname(e.path)))
        m = _NUMBER.search(e.path)
        if view and m:
            by_number.setdefault((posixpath.dirname(posixpath.dirname(e.path)), m.group(1)), {})[view] = e
    metas = [e for e in list_files(uri, ".parquet", options)
             if posixpath.basename(posixpath.dirname(e.path)) == "metadata"]
    if not metas:
        raise ShardError(f"{uri}: .npy embeddings in img_emb/ or text_emb/ but no metadata/*.parquet beside them")
    def one(e) -> tuple:  # a metadata file's footer and its vectors' .npy headers (storage round trips only)
        m = _NUMBER.search(e.path)
        vecs = by_number.get((posixpath.dirname(posixpath.dirname(e.path)), m.group(1)), {}) if m else {}
        if not vecs:
            raise ShardError(f"{e.uri}: no img_emb/img_emb_<n>.npy or text_emb/text_emb_<n>.npy with its number "
                             "beside its metadata/ folder")
        try:
            meta_pq = pq.read_metadata(e.path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"{e.uri}: not a readable Parquet file ({exc})") from exc
        names = meta_pq.schema.to_arrow_schema().names
        meta: dict[str, str] = _metadata_columns(names, cfg, e.uri)
        view_dims = {}
        for view, npy in sorted(vecs.items()):
            rows, dim, dtype, offset = npy_header(fs, npy.path, npy.uri)
            if rows != meta_pq.num_rows:
                raise ShardError(f"{npy.uri}: {rows} vectors for the {meta_pq.num_rows} rows of {e.uri}")
            view_dims[view] = dim
            meta.update({f"{view}_npy": npy.path, f"{view}_npy_dim": str(dim), f"{view}_npy_dtype": dtype.str,
                         f"{view}_npy_offset": str(offset), f"{view}_npy_stamp": f"{npy.size}|{npy.mtime_ns}"})
        return e, meta_pq.num_rows, meta, view_dims

    found = in_threads(one, metas)
    dims: dict[str, int | None] = {"image": cfg.image_dim, "text": cfg.text_dim}
    for _, _, _, view_dims in found:  # each view's dimension: the configured one, else the first file's
        for view, dim in view_dims.items():
            dims[view] = dims[view] or dim
    return [_shard(e, rows, meta, dims) for e, rows, meta, _ in found]


def _shard(e, rows: int, meta: dict[str, str], dims: dict[str, int | None]) -> Shard:
    views = [v for v in ("image", "text") if f"{v}_npy" in meta or f"{v}_vectors" in meta]
    for v in views:
        if dims[v]:
            meta[f"{v}_dim"] = str(dims[v])
    if "image" in views:
        meta.pop("image", None)  # the image view is precomputed: its bytes are not read
    columns = tuple(c for c in ("id", "image", "caption", "label") if c in meta) + tuple(f"{v}_feat" for v in views)
    return Shard(e.uri, e.path, e.size, rows, columns, e.mtime_ns, format="embeddings",
                 meta=tuple(sorted(meta.items())))


def _discover_parquet(uri: str, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    fs, _ = resolve(uri, options)
    dims: dict[str, int | None] = {"image": cfg.image_dim, "text": cfg.text_dim}
    found = []
    for e in list_files(uri, ".parquet", options):
        try:
            meta_pq = pq.read_metadata(e.path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"{e.uri}: not a readable Parquet file ({exc})") from exc
        schema = meta_pq.schema.to_arrow_schema()
        views = vector_columns(schema, cfg, e.uri)
        if not views:
            raise ShardError(f"{e.uri}: no vector column (a list of floats); found {schema.names}")
        meta = _metadata_columns(schema.names, cfg, e.uri)
        for view, col in views.items():
            meta[f"{view}_vectors"] = col
            if dims[view] is None and meta_pq.num_rows:
                dims[view] = _first_dim(fs, e.path, col)
        found.append((e, meta_pq.num_rows, meta))
    if not found:
        raise ShardError(f"{uri}: no .parquet files found")
    return [_shard(e, rows, meta, dims) for e, rows, meta in found]


def check_vectors(values: np.ndarray, present: np.ndarray, lengths: np.ndarray | None, dim: int,
                  view: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Dense (n, dim) float32 vectors, their validity and a note per row that was dropped."""
    n = len(present)
    dense = np.zeros((n, dim), dtype=np.float32)
    valid = present.copy()
    notes: list[str | None] = [None] * n
    if lengths is not None:  # list column: each row's own length
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i in np.flatnonzero(present):
            if lengths[i] != dim:
                valid[i], notes[i] = False, f"{view}: vector of dimension {lengths[i]}, expected {dim}"
            else:
                dense[i] = values[offsets[i]:offsets[i + 1]]
    else:
        dense[present] = values[present]
    finite = np.isfinite(dense).all(axis=1)
    for i in np.flatnonzero(valid & ~finite):
        valid[i], notes[i] = False, f"{view}: vector not finite (NaN or inf)"
    dense[~valid] = 0.0
    return dense, valid, notes


def feat_array(dense: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), dense.shape[1],
                                             mask=pa.array(~valid))


def _column_vectors(col: pa.ChunkedArray | pa.Array, dim: int, view: str) -> tuple[pa.Array, list[str | None]]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        # flatten() drops null lists' slots: rebuild a row-aligned (n, width) array
        values = np.zeros((len(arr), width), dtype=np.float64)
        values[present] = arr.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        if width != dim:
            notes = [f"{view}: vector of dimension {width}, expected {dim}" if p else None for p in present]
            return feat_array(np.zeros((len(arr), dim), np.float32), np.zeros(len(arr), bool)), notes
        dense, valid, notes = check_vectors(values, present, None, dim, view)
    else:
        lengths = np.where(present, arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), 0)
        values = arr.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False)
        dense, valid, notes = check_vectors(values, present, lengths, dim, view)
    return feat_array(dense, valid), notes


def _npy_rows(fs, shard: Shard, view: str, first: int, n: int, dim: int) -> tuple[pa.Array, list[str | None]]:
    file_dim = int(shard.get(f"{view}_npy_dim"))
    if file_dim != dim:
        notes = [f"{view}: vector of dimension {file_dim}, expected {dim}"] * n
        return feat_array(np.zeros((n, dim), np.float32), np.zeros(n, bool)), notes
    dtype = np.dtype(shard.get(f"{view}_npy_dtype"))
    row_bytes = file_dim * dtype.itemsize
    path = shard.get(f"{view}_npy")
    with fs.open_input_file(path) as f:
        f.seek(int(shard.get(f"{view}_npy_offset")) + first * row_bytes)
        raw = f.read(n * row_bytes)
    if len(raw) != n * row_bytes:
        raise ShardError(f"{path}: truncated .npy data after row {first}")
    values = np.frombuffer(raw, dtype=dtype).reshape(n, file_dim).astype(np.float32)
    dense, valid, notes = check_vectors(values, np.ones(n, bool), None, dim, view)
    return feat_array(dense, valid), notes


def read(shard: Shard, storage: StorageOptions | None, rows_per_batch: int) -> Iterator[pa.Table]:
    fs, _ = resolve(shard.uri, storage)
    cols = {k: shard.get(k) for k in ("id", "image", "caption", "label", "image_vectors", "text_vectors")}
    wanted = sorted({c for c in cols.values() if c})
    for offset, t in parquet_batches(shard.uri, fs, shard.path, rows_per_batch, lambda _: wanted):
        n = t.num_rows
        ids = [None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
               for v in _col(t, cols["id"])]
        captions, caption_issue = [], []
        for raw in _col(t, cols["caption"]):
            text, note = text_of(raw, "caption") if isinstance(raw, bytes) else (label_text(raw), None)
            captions.append(text)
            caption_issue.append(note)
        labels = [label_text(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                  for v in _col(t, cols["label"])]
        vectors, notes = {}, {"caption_issue": caption_issue}
        for view, feat, issue in (("image", "image_feat", "image_issue"), ("text", "text_feat", "caption_issue")):
            dim = shard.get(f"{view}_dim")
            if dim is None:
                continue
            if shard.get(f"{view}_vectors"):
                arr, vnotes = _column_vectors(t.column(shard.get(f"{view}_vectors")), int(dim), view)
            elif shard.get(f"{view}_npy"):
                arr, vnotes = _npy_rows(fs, shard, view, offset, n, int(dim))
            else:
                continue
            vectors[feat] = arr
            notes[issue] = [v or old for v, old in zip(vnotes, notes.get(issue, [None] * n))]
        images = t.column(cols["image"]).cast(pa.binary()).to_pylist() if cols["image"] else [None] * n
        yield records(ids, images, captions, labels, shard.uri, offset, notes=notes, vectors=vectors)


def _col(t: pa.Table, name: str | None) -> list:
    if name is None:
        return [None] * t.num_rows
    c = t.column(name)
    if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
        return c.cast(pa.binary()).to_pylist()
    return c.to_pylist()
