"""Images for the report: fetch the original bytes of a few rows, and make small thumbnails."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from raymmc.io.shards import Shard
from raymmc.io.storage import StorageError, StorageOptions, resolve

READ_ROWS = 256  # rows per record batch when an image is read through a format's reader


def load_images(pairs: Sequence[tuple[str, int]], storage_options: StorageOptions | None = None,
                shards: Sequence[Shard] = ()) -> list[bytes | None]:
    """The encoded ``image`` of each ``(source file URI, row)``, or None where there is none.

    ``shards``: the run's input files; a file in another archive format (``raymmc.io.formats``: a tar, a COCO
    annotation file, img2dataset Parquet) is read through its format's reader, up to its last wanted row.

    Reads only the ``image`` column of the row groups that hold a wanted row, one file at a
    time, so a report of a large archive reads a few MB rather than the archive. A file that
    cannot be read (moved since the run, no ``image`` column) gives None for its rows: the
    report then shows fewer pictures instead of failing the run.
    """
    out: list[bytes | None] = [None] * len(pairs)
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, (source, _) in enumerate(pairs):
        by_file[source].append(i)
    other = {s.uri: s for s in shards if s.format != "shards"}
    for source, positions in by_file.items():
        if source in other:
            _from_reader(other[source], pairs, positions, out, storage_options)
            continue
        try:
            fs, path = resolve(source, storage_options)
            pf = pq.ParquetFile(fs.open_input_file(path))
        except (OSError, StorageError, ValueError):
            continue
        if "image" not in pf.schema_arrow.names:
            continue
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        by_group: dict[int, list[int]] = defaultdict(list)
        for i in positions:
            row = int(pairs[i][1])
            if 0 <= row < starts[-1]:
                by_group[int(np.searchsorted(starts, row, side="right") - 1)].append(i)
        for g, members in sorted(by_group.items()):
            column = pf.read_row_group(g, columns=["image"]).column("image")
            for i in members:
                value = column[int(pairs[i][1]) - int(starts[g])].as_py()
                out[i] = value if value else None
    return out


def _from_reader(shard: Shard, pairs: Sequence[tuple[str, int]], positions: list[int], out: list,
                 storage_options: StorageOptions | None) -> None:
    """Fill ``out`` at ``positions`` from the format reader's records (a file that cannot be read leaves None)."""
    from raymmc.io.formats import read_batches

    wanted: dict[int, list[int]] = defaultdict(list)
    for i in positions:
        wanted[int(pairs[i][1])].append(i)
    last = max(wanted)
    try:
        for batch in read_batches(shard, storage_options, READ_ROWS):
            rows = batch.column("row").to_pylist()
            if not any(r in wanted for r in rows):
                if rows and rows[-1] >= last:
                    return
                continue
            images = batch.column("image").to_pylist()
            for r, image in zip(rows, images):
                for i in wanted.get(r, ()):
                    out[i] = image or None
            if rows and rows[-1] >= last:
                return
    except Exception:  # moved, changed or unreadable since the run read it: fewer pictures, not a failed report
        return


def thumbnail(data: bytes | None, size: int = 128) -> str | None:
    """A ``data:`` URI of the image shrunk to fit ``size``×``size`` px, or None if it won't decode.

    Transparency is composited on white (clip-art PNGs would otherwise turn black as JPEG).
    Both PNG and JPEG are tried and the smaller kept: PNG wins for flat clip-art, JPEG for photos.
    """
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale, much faster
            im = ImageOps.exif_transpose(im)
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
            else:
                im = im.convert("RGB")
    except Exception:  # Pillow raises many types for corrupt/truncated/unsupported files
        return None
    encoded = []
    for fmt, mime, kw in (("PNG", "image/png", {"optimize": True}),
                          ("JPEG", "image/jpeg", {"quality": 85, "optimize": True})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        encoded.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, best = min(encoded, key=lambda e: e[0])
    return f"data:{mime};base64,{base64.b64encode(best).decode('ascii')}"
