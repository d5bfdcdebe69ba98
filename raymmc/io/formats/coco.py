"""COCO-style caption annotations (``captions_<split>.json``: ``images`` with ``id`` and ``file_name``,
``annotations`` with ``image_id`` and ``caption``) beside the image files. An item is an image: its id is the
image ``id`` as a string, its captions are joined (or the first kept: ``archive.coco_captions``).

The annotation file is the unit of work: one read task per JSON file reads its images. The driver parses each
annotation file once at discovery to count its images (annotations are metadata: kilobytes per thousand
images); the images themselves are only read by the read tasks."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import defaultdict
from typing import Any, Iterator

import pyarrow as pa

from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.formats.records import label_text, records
from raymmc.io.shards import Shard, ShardError
from raymmc.io.storage import StorageError, StorageOptions, is_remote, list_files, read_bytes, resolve


def parse(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ShardError(f"{where}: not valid JSON ({exc})") from exc
    if not is_coco(doc):
        raise ShardError(f"{where}: not a COCO caption file (needs 'images' and 'annotations' lists, the "
                         "annotations with a 'caption')")
    return doc


def is_coco(doc: object) -> bool:
    """A COCO caption file: ``images`` and ``annotations`` lists whose annotations have a ``caption``. COCO's
    instances_* / person_keypoints_* files beside it have the same two lists (with boxes, no captions): read as
    captions, they would read every image once more."""
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        return False
    first = doc["annotations"][:5]
    return bool(first) and all(isinstance(a, dict) and "caption" in a for a in first)


def inside(name: str) -> bool:
    """Whether a ``file_name`` stays inside the image folder: relative and without ``..`` (an annotation file must
    not make a read task open any file the worker can read)."""
    return not (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name))


def candidate_image_dirs(json_uri: str) -> list[str]:
    """Where COCO's images usually are, relative to an annotation file."""
    sep = posixpath if is_remote(json_uri) else os.path
    folder = sep.dirname(json_uri)
    m = re.match(r"captions_(.+)\.json$", sep.basename(json_uri))
    out = [folder, sep.join(folder, "images")]
    if m:
        out += [sep.join(sep.dirname(folder), m.group(1)), sep.join(folder, m.group(1)),
                sep.join(sep.dirname(folder), "images", m.group(1))]
    return out


def find_image_dir(json_uri: str, doc: dict, options: StorageOptions | None, configured: str | None) -> str:
    from raymmc.io.storage import exists, join

    names = (im.get("file_name") for im in doc["images"] if isinstance(im, dict))
    first = next((n for n in names if isinstance(n, str) and n and inside(n)), None)
    if configured:
        return configured
    if first is None:
        return candidate_image_dirs(json_uri)[0]
    for d in candidate_image_dirs(json_uri):
        if exists(join(d, first), options):
            return d
    raise ShardError(f"{json_uri}: cannot find the images (looked for {first!r} in "
                     f"{', '.join(candidate_image_dirs(json_uri))}); set archive.coco_images")


def discover(uri: str, options: StorageOptions | None, cfg: ArchiveConfig) -> list[Shard]:
    shards = []
    for e in list_files(uri, ".json", options):
        if e.path.endswith("_stats.json"):  # img2dataset's statistics, not annotations
            continue
        try:
            doc = json.loads(read_bytes(e.uri, options))
        except ValueError as exc:
            raise ShardError(f"{e.uri}: not valid JSON ({exc})") from exc
        if not is_coco(doc):  # another JSON beside the captions (instances_*.json...): not ours to read
            continue
        image_dir = find_image_dir(e.uri, doc, options, cfg.coco_images)
        meta = {"images": image_dir, "captions": cfg.coco_captions, "separator": cfg.coco_caption_separator,
                "label_column": cfg.label_column}
        # `is not None`: an empty separator is a setting, not an absence
        shards.append(Shard(e.uri, e.path, e.size, len(doc["images"]), ("id", "image", "caption", "label"),
                            e.mtime_ns, format="coco",
                            meta=tuple(sorted((k, v) for k, v in meta.items() if v is not None))))
    if not shards:
        raise ShardError(f"{uri}: no COCO caption files found (.json with 'images' and captioned 'annotations')")
    return shards


def items(doc: dict, mode: str, separator: str, label_column: str | None) -> Iterator[tuple]:
    """``(id, file_name, caption, label, caption_issue)`` per image entry, in file order."""
    captions: dict[Any, list[str]] = defaultdict(list)
    for ann in doc["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str):
            captions[ann.get("image_id")].append(ann["caption"])
    for im in doc["images"]:
        if not isinstance(im, dict):
            yield None, None, None, None, "image entry is not an object"
            continue
        caps = captions.get(im.get("id"), [])
        caption = (separator.join(c.strip() for c in caps) if mode == "join" else caps[0]) if caps else None
        image_id = im.get("id")
        yield (None if image_id is None else str(image_id)), im.get("file_name"), caption, \
            label_text(im.get(label_column)) if label_column else None, None


def read(shard: Shard, storage: StorageOptions | None, rows_per_batch: int) -> Iterator[pa.Table]:
    doc = parse(read_bytes(shard.uri, storage), shard.uri)
    image_dir = shard.get("images")
    fs, base = resolve(image_dir, storage)  # once per file: an object store's client is not made per image
    sep = posixpath if is_remote(image_dir) else os.path
    buf: list[tuple] = []
    row = 0

    def flush() -> pa.Table:
        ids, images, caps, labels, img_issue, cap_issue = (list(c) for c in zip(*buf))
        return records(ids, images, caps, labels, shard.uri, row - len(buf),
                       notes={"image_issue": img_issue, "caption_issue": cap_issue})

    for id_, name, caption, label, issue in items(doc, shard.get("captions", "join"), shard.get("separator", " "),
                                                  shard.get("label_column")):
        image, image_issue = None, issue
        if isinstance(name, str) and name and not inside(name):
            image_issue = f"image: file_name {name!r} is outside the image folder (absolute or '..'); not read"
        elif isinstance(name, str) and name:
            try:
                with fs.open_input_stream(sep.join(base, name)) as f:
                    image = f.read()
            except (FileNotFoundError, OSError, StorageError) as exc:
                image_issue = f"image: cannot read {name} ({type(exc).__name__})"
        elif issue is None:
            image_issue = "image: no file_name"
        buf.append((id_, image, caption, label, image_issue, None))
        row += 1
        if len(buf) >= rows_per_batch:
            yield flush()
            buf = []
    if buf:
        yield flush()
