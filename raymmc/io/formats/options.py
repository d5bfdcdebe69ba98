"""How to read an archive that is not in raymmc's own shard layout (``archive.*`` in the run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FORMATS = ("auto", "shards", "img2dataset", "webdataset", "coco", "embeddings")


@dataclass
class ArchiveConfig:
    # auto: detected from the files (the manifest's `input_format` says what was found and why).
    format: Literal["auto", "shards", "img2dataset", "webdataset", "coco", "embeddings"] = "auto"
    # img2dataset Parquet and embedding metadata: the item id. "auto": `key` (img2dataset's), then `id`,
    # then `image_path` (clip-retrieval's metadata without keys).
    id_column: str = "auto"
    # img2dataset Parquet: the column with the encoded image. "auto": the first of jpg, png, webp, image.
    image_column: str = "auto"
    # img2dataset Parquet and embedding metadata: the caption. "auto": `caption` (img2dataset keeps its input's
    # caption column under that name), then `txt`, then `text`.
    caption_column: str = "auto"
    # Ground truth for the metrics, where the archive has it: a column (img2dataset, embeddings), a field of a
    # WebDataset sample's .json or of a COCO image entry. WebDataset's .cls member is read without it.
    label_column: str | None = None
    # COCO has several captions per image and an item is an image: keep them all, joined, or the first.
    coco_captions: Literal["join", "first"] = "join"
    coco_caption_separator: str = " "
    # COCO: the folder of the images named by `file_name`; None: looked for beside the annotation file
    # (its folder, `images/`, or `../<split>/` for `annotations/captions_<split>.json`).
    coco_images: str | None = None
    # WebDataset: a tar member larger than this is not read (its item gets a note). A read task holds members in
    # memory, and the decode stage's guards (max_pixels) only see the bytes once they are there: one huge member
    # (a video, a hostile tar) must not take the worker down first.
    max_member_bytes: int = 256 * 2**20
    # Precomputed vectors in Parquet: the list / fixed-size-list column of each view. "auto": a float list column
    # whose name mentions text, txt or caption (text vectors) or not (image vectors); "none": not precomputed.
    image_vectors: str = "auto"
    text_vectors: str = "auto"
    # Expected vector dimensions; None: the first file's. Vectors of another dimension are dropped, with a note.
    image_dim: int | None = None
    text_dim: int | None = None
    # The same image bytes under several ids: "report" lists the groups in the manifest; "drop" also rejects
    # every copy after the first (by file, then row) as "duplicate image"; "off" skips the pass (one more
    # Ray Data job over the usable items' ids and hashes).
    duplicate_images: Literal["report", "drop", "off"] = "report"
    duplicate_groups_shown: int = 20  # groups listed in the manifest (all are counted)
