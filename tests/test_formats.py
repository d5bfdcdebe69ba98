"""Archives in the formats users already have (issue 16): img2dataset Parquet, WebDataset tars, COCO caption
JSON and precomputed embeddings (clip-retrieval's .npy layout and a Parquet vector column). Each test writes a
small archive itself (real tuxpaint images and captions, or synthetic vectors), checks the reader without Ray,
and runs `raymmc run` on it: every item is assigned or rejected exactly once."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymmc.cli import main
from raymmc.io.formats import detect, discover_input, read_batches
from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.formats.webdataset import split_key
from raymmc.io.rundir import RunDir
from raymmc.io.shards import ShardError

CLASSES = ("animals", "food", "town")
PER_CLASS = 8
# One view per run keeps the runs short: image features (MobileNetV2) for the WebDataset run, TF-IDF caption
# features (fitted on the archive's captions, read through the format's reader) for img2dataset and COCO; images
# are decoded (and hashed) in every run.
IMAGE_ONLY = ["--set", "extract.text.model=none", "--set", "cluster.kmeans.view=image"]
TEXT_ONLY = ["--set", "extract.image.model=none", "--set", "extract.text.model=tfidf",
             "--set", "extract.text.tfidf.dims=16", "--set", "cluster.kmeans.view=text"]


def jpeg(png: bytes) -> bytes:
    """A tuxpaint PNG (RGBA) as the JPEG img2dataset would have written."""
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    flat = Image.new("RGB", im.size, (255, 255, 255))
    flat.paste(im, mask=im.getchannel("A"))
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def items(tux_items):
    """24 real items, 8 per class: (key, jpeg, caption, label)."""
    labels = np.array(tux_items.labels)
    keep = [i for c in CLASSES for i in np.flatnonzero(labels == c)[:PER_CLASS]]
    return [(f"{n:09d}", jpeg(tux_items.images[i]), tux_items.captions[i], tux_items.labels[i])
            for n, i in enumerate(keep)]


def read_all(uri: str, cfg: ArchiveConfig | None = None) -> tuple[str, pa.Table]:
    found = discover_input(uri, cfg=cfg)
    tables = [t for s in found.shards for t in read_batches(s, None, rows_per_batch=7)]
    for s in found.shards:  # the rows a reader yields are the rows discovery counted
        assert sum(t.num_rows for t in tables if t.column("source")[0].as_py() == s.uri) == s.rows
    return found.format, pa.concat_tables(tables, promote_options="default")


def run_cli(uri: str, out, name: str, feature_cache: str, *extra: str) -> RunDir:
    code = main(["run", "--input", uri, "--output", str(out / "runs"), "--run-name", name, "--clusters", "3",
                 "--set", f"extract.cache={feature_cache}", "--set", "report=false", *extra])
    assert code == 0
    return RunDir(str(out / "runs" / name))


def check_every_item_once(rundir: RunDir, ids: list[str]) -> tuple[dict, dict]:
    """Every input id is assigned or rejected, exactly once; returns ({id: assignment}, {id: reason})."""
    assignments, rejects = rundir.read_table("assignments"), rundir.read_table("rejects")
    assigned = assignments.column("id").to_pylist()
    rejected = rejects.column("id").to_pylist()
    assert sorted(assigned + rejected) == sorted(ids)
    manifest = rundir.read_json("manifest.json")
    assert manifest["counts"]["read"] == len(ids) == manifest["counts"]["assigned"] + manifest["counts"]["rejected"]
    return ({r["id"]: r for r in assignments.to_pylist()}, {r["id"]: r["reason"] for r in rejects.to_pylist()})


# --- img2dataset Parquet -----------------------------------------------------------------------------------

FAILED = [("900000001", "failed_to_download", "HTTP Error 404: Not Found"),
          ("900000002", "failed_to_resize", "image decoding error")]
COPY = "800000000"


def write_img2dataset(root, items) -> list[str]:
    """img2dataset's parquet output layout (output_format=parquet, encode_format=jpg, save_additional_columns
    =["label"]), in two files with its _stats.json, with failed rows; returns every key."""
    root.mkdir()
    rows = [{"url": f"https://example.org/{k}.png", "caption": c, "key": k, "status": "success",
             "error_message": None, "width": 256, "height": 256, "original_width": 512, "original_height": 512,
             "exif": "{}", "sha256": None, "jpg": img, "label": lab} for k, img, c, lab in items]
    # the first image again under another key (a mirror of the same picture)
    rows.append(dict(rows[0], key=COPY, url="https://mirror.example.org/a.png", caption="the same picture"))
    rows += [{"url": f"https://example.org/{k}.png", "caption": "lost", "key": k, "status": st,
              "error_message": err, "width": None, "height": None, "original_width": None, "original_height": None,
              "exif": None, "sha256": None, "jpg": None, "label": None} for k, st, err in FAILED]
    # the input's columns (url, caption, the additional ones), then img2dataset's, then the image
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("label", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                        ("exif", pa.string()), ("sha256", pa.string()), ("jpg", pa.binary())])
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema), root / f"{n:05d}.parquet")
        (root / f"{n:05d}_stats.json").write_text(json.dumps({"count": len(part), "successes": len(part)}))
    return [r["key"] for r in rows]


def test_img2dataset_reader(tmp_path, items):
    write_img2dataset(tmp_path / "i2d", items)
    fmt, why = detect(str(tmp_path / "i2d"))
    assert fmt == "img2dataset" and "'key'" in why
    fmt, t = read_all(str(tmp_path / "i2d"), ArchiveConfig(label_column="label"))
    assert t.column("id").to_pylist()[:2] == [items[0][0], items[1][0]]
    rejects = {r["id"]: r["reject"] for r in t.to_pylist() if r["reject"]}
    assert rejects == {k: f"img2dataset status {st}: {err}" for k, st, err in FAILED}
    ok = [r for r in t.to_pylist() if not r["reject"]]
    assert all(r["image"] and r["caption"] and r["label"] in CLASSES for r in ok)


def test_img2dataset_detected_beside_an_id_column(tmp_path, items):
    """img2dataset run with save_additional_columns=["id"] has an `id` too: still img2dataset (its status, or its
    key with a jpg), not raymmc's shards (whose reader would ignore the jpg column)."""
    (tmp_path / "withid").mkdir()
    rows = [{"id": f"item-{k}", "key": k, "caption": c, "status": "success", "error_message": None, "jpg": img}
            for k, img, c, _ in items[:2]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "withid" / "00000.parquet")
    fmt, why = detect(str(tmp_path / "withid"))
    assert fmt == "img2dataset" and "'status'" in why
    _, t = read_all(str(tmp_path / "withid"))
    assert t.column("image").to_pylist() == [items[0][1], items[1][1]]
    pq.write_table(pa.Table.from_pylist(rows).drop(["status", "error_message"]), tmp_path / "withid" / "00000.parquet")
    assert detect(str(tmp_path / "withid"))[0] == "img2dataset"


@pytest.mark.slow
def test_img2dataset_run(ray_session, tmp_path, items, feature_cache):
    keys = write_img2dataset(tmp_path / "i2d", items)
    rundir = run_cli(str(tmp_path / "i2d"), tmp_path, "i2d", feature_cache, *TEXT_ONLY,
                     "--set", "archive.label_column=label", "--set", "archive.duplicate_images=drop")
    assigned, rejected = check_every_item_once(rundir, keys)
    assert rejected == {**{k: f"img2dataset status {st}: {err}" for k, st, err in FAILED},
                        COPY: f"duplicate image: same bytes as {items[0][0]}"}
    manifest = rundir.read_json("manifest.json")
    assert manifest["input_format"]["format"] == "img2dataset" and "key" in manifest["input_format"]["why"]
    assert manifest["duplicate_images"] == {"groups": 1, "items": 2, "dropped": 1,
                                            "examples": [{"size": 2, "ids": [items[0][0], COPY]}]}
    assert rundir.read_json("metrics.json")["n_labeled"] == len(items)


# --- WebDataset ----------------------------------------------------------------------------------------------

def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_webdataset(root, items) -> dict:
    """Two tars of img2dataset's webdataset output ({key}.jpg/.txt/.json, a sidecar .parquet with the failed
    rows, {shard}_stats.json), with a corrupt .jpg, a caption that is not UTF-8 and a dotted member name."""
    root.mkdir()
    half = len(items) // 2
    corrupt, latin1, dotted = items[1][0], items[2][0], items[3][0]
    for n, part in enumerate((items[:half], items[half:])):
        with tarfile.open(root / f"{n:05d}.tar", "w") as tf:
            for key, img, cap, lab in part:
                if key == corrupt:
                    img = b"\xff\xd8\xff this is not a JPEG"
                text = cap.encode("utf-8") if key != latin1 else "café crème".encode("latin-1")
                add(tf, f"{key}.left.jpg" if key == dotted else f"{key}.jpg", img)
                add(tf, f"{key}.txt", text)
                add(tf, f"{key}.json", json.dumps({"key": key, "caption": cap, "status": "success",
                                                   "label": lab}).encode())
        failed = FAILED if n == 0 else []
        side = [{"key": k, "status": "success", "error_message": None} for k, *_ in part]
        side += [{"key": k, "status": st, "error_message": err} for k, st, err in failed]
        pq.write_table(pa.Table.from_pylist(side), root / f"{n:05d}.parquet")
        (root / f"{n:05d}_stats.json").write_text(json.dumps({"successes": len(part)}))
    return {"ids": [k for k, *_ in items] + [k for k, *_ in FAILED], "corrupt": corrupt, "latin1": latin1,
            "dotted": dotted}


def test_webdataset_key_rule():
    # WebDataset's rule: the key is the path up to the first dot of the file name, the field the rest.
    assert split_key("a.b.jpg") == ("a", "b.jpg")
    assert split_key("dir.v1/000001.seg.png") == ("dir.v1/000001", "seg.png")
    assert split_key("000001.txt") == ("000001", "txt")
    assert split_key("README") == ("README", "")


def test_webdataset_reader(tmp_path, items):
    wds = write_webdataset(tmp_path / "wds", items)
    fmt, why = detect(str(tmp_path / "wds"))
    assert fmt == "webdataset" and "tar" in why
    fmt, t = read_all(str(tmp_path / "wds"), ArchiveConfig(label_column="label"))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == sorted(wds["ids"])
    latin1 = rows[wds["latin1"]]
    assert latin1["caption"].startswith("caf") and "not valid UTF-8" in latin1["caption_issue"]
    assert rows[wds["dotted"]]["image"] == items[3][1]  # "<key>.left.jpg" is field "left.jpg" of <key>
    assert rows[wds["corrupt"]]["image"].startswith(b"\xff\xd8\xff this")
    assert rows[items[0][0]]["label"] == items[0][3]
    assert rows[FAILED[0][0]]["reject"] == f"img2dataset status {FAILED[0][1]}: {FAILED[0][2]}"


def write_tar(path, items, mode: str = "w") -> None:
    with tarfile.open(path, mode) as tf:
        for key, img, cap, _ in items:
            add(tf, f"{key}.jpg", img)
            add(tf, f"{key}.txt", cap.encode())


def test_webdataset_truncated_tar(tmp_path, items):
    """A tar that breaks off keeps the samples before the break, and the one it broke in is rejected saying why
    (discovery counts the same ones: read_all checks); one that breaks before its first sample names the file."""
    root = tmp_path / "cut"
    root.mkdir()
    write_tar(root / "00000.tar", items[:3])
    with tarfile.open(root / "00000.tar") as tf:
        second_jpg = tf.getmembers()[2]
    data = (root / "00000.tar").read_bytes()
    (root / "00000.tar").write_bytes(data[:second_jpg.offset_data + 100])  # cut inside the 2nd sample's image
    _, t = read_all(str(root))
    assert t.column("id").to_pylist() == [items[0][0], items[1][0]]
    assert t.column("image").to_pylist()[0] == items[0][1] and t.column("reject").to_pylist()[0] is None
    assert t.column("reject").to_pylist()[1].startswith(f"tar data breaks off at member {items[1][0]}.jpg")

    write_tar(root / "00000.tar.gz", items[:6], "w:gz")  # a compressed tar cut short: the same rule
    (root / "00000.tar").unlink()
    data = (root / "00000.tar.gz").read_bytes()
    (root / "00000.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    _, t = read_all(str(root))
    rejects = t.column("reject").to_pylist()
    assert 1 < len(rejects) <= 6 and rejects[-1].startswith("tar data breaks off") and not any(rejects[:-1])

    (root / "00000.tar.gz").write_bytes(data[:20])  # not even the first header
    with pytest.raises(ShardError, match="00000.tar.gz: unreadable tar data"):
        discover_input(str(root))


def test_webdataset_member_size_limit(tmp_path, items):
    """A member over archive.max_member_bytes is not read: a note on its view, the rest of the sample is kept."""
    (tmp_path / "big").mkdir()
    small, big = sorted(items[:2], key=lambda it: len(it[1]))
    with tarfile.open(tmp_path / "big" / "00000.tar", "w") as tf:
        add(tf, f"{small[0]}.jpg", small[1])
        add(tf, f"{small[0]}.txt", b"x" * (len(small[1]) + 1))
        add(tf, f"{big[0]}.jpg", big[1])
        add(tf, f"{big[0]}.txt", big[2].encode())
    _, t = read_all(str(tmp_path / "big"), ArchiveConfig(max_member_bytes=len(small[1])))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows[small[0]]["image"] == small[1] and rows[small[0]]["caption"] is None
    assert "over archive.max_member_bytes" in rows[small[0]]["caption_issue"]
    assert rows[big[0]]["image"] is None and rows[big[0]]["caption"] == big[2]
    assert rows[big[0]]["image_issue"].startswith(f"image: member {big[0]}.jpg is {len(big[1])} bytes")


def test_sidecar_failures_counted_from_status(tmp_path, monkeypatch):
    """Discovery counts a tar's sidecar failures from the status column alone (no per-row conversion), and the
    count is what the reader yields."""
    import pyarrow.fs as pafs

    from raymmc.io.formats import img2dataset

    side = tmp_path / "00000.parquet"
    status = ["success", "failed_to_download", None, "failed_to_resize"]  # a null status is not a failure
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "status": status, "error_message": [None, "404", None, "x"]}),
                   side)
    fs = pafs.LocalFileSystem()
    assert img2dataset.failed_rows(str(side), fs, "x", 0).num_rows == 2
    monkeypatch.setattr(img2dataset, "convert", None)  # counting must not convert rows
    assert img2dataset.count_failed(str(side), fs) == 2


@pytest.mark.slow
def test_webdataset_run(ray_session, tmp_path, items, feature_cache):
    wds = write_webdataset(tmp_path / "wds", items)
    rundir = run_cli(str(tmp_path / "wds"), tmp_path, "wds", feature_cache, *IMAGE_ONLY,
                     "--input-format", "webdataset", "--set", "report=true")
    assigned, rejected = check_every_item_once(rundir, wds["ids"])
    # image-only run: the corrupt .jpg leaves nothing to cluster on, with the decoder's reason
    assert rejected[wds["corrupt"]].startswith("image: ")
    assert rejected[FAILED[1][0]] == f"img2dataset status {FAILED[1][1]}: {FAILED[1][2]}"
    assert wds["dotted"] in assigned and wds["latin1"] in assigned
    manifest = rundir.read_json("manifest.json")
    assert manifest["input_format"] == {"format": "webdataset", "why": "set by archive.format (--input-format)",
                                        "precomputed": []}
    assert len(manifest["inputs"]["files"]) == 2  # one read task per tar
    # the report's pictures are read back out of the tars
    assert rundir.read_bytes("report/index.html").decode().count("data:image/") >= 6


# --- COCO ----------------------------------------------------------------------------------------------------

def write_coco(root, items) -> dict:
    """annotations/captions_val2017.json with two captions per image, images in val2017/; one image file is
    missing and one image has no caption (it is clustered on its image)."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, anns = [], []
    missing, uncaptioned = 1000 + 2, 1000 + 5
    for n, (key, img, cap, lab) in enumerate(items):
        image_id = 1000 + n
        name = f"{image_id:012d}.jpg"
        if image_id != missing:
            (root / "val2017" / name).write_bytes(img)
        images.append({"id": image_id, "file_name": name, "width": 256, "height": 256, "label": lab})
        if image_id != uncaptioned:
            anns += [{"id": 2 * n, "image_id": image_id, "caption": cap},
                     {"id": 2 * n + 1, "image_id": image_id, "caption": f"a {lab} picture"}]
    doc = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(doc))
    return {"ids": [str(im["id"]) for im in images], "missing": str(missing), "uncaptioned": str(uncaptioned)}


def test_coco_reader(tmp_path, items):
    coco = write_coco(tmp_path / "coco", items)
    fmt, why = detect(str(tmp_path / "coco"))
    assert fmt == "coco" and "captions_val2017.json" in why
    _, t = read_all(str(tmp_path / "coco"))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == sorted(coco["ids"])
    first = rows[coco["ids"][0]]
    assert first["caption"] == f"{items[0][2]} a {items[0][3]} picture" and first["image"] == items[0][1]
    assert rows[coco["missing"]]["image"] is None and "cannot read" in rows[coco["missing"]]["image_issue"]
    assert rows[coco["uncaptioned"]]["caption"] is None
    _, t = read_all(str(tmp_path / "coco"), ArchiveConfig(coco_captions="first", label_column="label"))
    first = t.to_pylist()[0]
    assert first["caption"] == items[0][2] and first["label"] == items[0][3]
    _, t = read_all(str(tmp_path / "coco"), ArchiveConfig(coco_caption_separator=""))  # "" is kept, not " "
    assert t.to_pylist()[0]["caption"] == f"{items[0][2]}a {items[0][3]} picture"


def test_coco_skips_instance_annotations(tmp_path, items):
    """COCO's instances_* / person_keypoints_* files share the annotations folder and its 'images' list: they are
    not caption files, so each image is read once (from the captions file)."""
    coco = write_coco(tmp_path / "coco", items[:4])
    doc = json.loads((tmp_path / "coco" / "annotations" / "captions_val2017.json").read_text())
    boxes = [{"id": n, "image_id": im["id"], "bbox": [0, 0, 1, 1], "category_id": 1}
             for n, im in enumerate(doc["images"])]
    for name in ("instances_val2017.json", "person_keypoints_val2017.json"):
        (tmp_path / "coco" / "annotations" / name).write_text(json.dumps({**doc, "annotations": boxes}))
    assert detect(str(tmp_path / "coco"))[0] == "coco"
    found = discover_input(str(tmp_path / "coco"))
    assert [s.path.rsplit("/", 1)[-1] for s in found.shards] == ["captions_val2017.json"]
    _, t = read_all(str(tmp_path / "coco"))
    assert sorted(t.column("id").to_pylist()) == sorted(coco["ids"])


def test_coco_file_names_stay_in_the_image_folder(tmp_path, items):
    """An absolute or '..' file_name would read any file the worker can: it is refused, as an image note."""
    coco = write_coco(tmp_path / "coco", items[:3])
    (tmp_path / "secret.jpg").write_bytes(items[0][1])
    path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    doc = json.loads(path.read_text())
    doc["images"][1]["file_name"] = "../../secret.jpg"
    doc["images"][2]["file_name"] = str(tmp_path / "secret.jpg")
    path.write_text(json.dumps(doc))
    _, t = read_all(str(tmp_path / "coco"))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows[coco["ids"][0]]["image"] == items[0][1]
    for escaping in (rows[coco["ids"][1]], rows[coco["ids"][2]]):
        assert escaping["image"] is None and "outside the image folder" in escaping["image_issue"]


@pytest.mark.slow
def test_coco_run(ray_session, tmp_path, items, feature_cache):
    coco = write_coco(tmp_path / "coco", items)
    rundir = run_cli(str(tmp_path / "coco"), tmp_path, "coco", feature_cache, *TEXT_ONLY,
                     "--set", "archive.label_column=label")
    assigned, rejected = check_every_item_once(rundir, coco["ids"])
    assert rejected == {coco["uncaptioned"]: "image present but this run does not use images; no caption"}
    missing = assigned[coco["missing"]]  # clustered on its two captions, with the reason its image is missing
    assert not missing["has_image"]
    assert missing["note"].startswith(f"image: cannot read {int(coco['missing']):012d}.jpg")
    assert rundir.read_json("manifest.json")["input_format"]["format"] == "coco"


# --- precomputed embeddings ------------------------------------------------------------------------------------

def vectors(n: int, dim: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Three well-separated clusters in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, dim)) * 5
    labels = np.arange(n) % 3
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), [CLASSES[c] for c in labels]


def write_clip_retrieval(root, n: int = 30) -> dict:
    """clip-retrieval's output: metadata/metadata_<i>.parquet with img_emb/img_emb_<i>.npy and
    text_emb/text_emb_<i>.npy; one image vector with a NaN."""
    for d in ("metadata", "img_emb", "text_emb"):
        (root / d).mkdir(parents=True)
    img, labels = vectors(n, 16, 0)
    txt, _ = vectors(n, 8, 1)
    img[4, 3] = np.nan
    paths = [f"/data/images/{i:05d}.jpg" for i in range(n)]
    for part, sl in enumerate((slice(0, n // 2), slice(n // 2, n))):
        pq.write_table(pa.table({"image_path": paths[sl], "caption": [f"caption {i}" for i in range(n)][sl],
                                 "label": labels[sl]}), root / "metadata" / f"metadata_{part}.parquet")
        np.save(root / "img_emb" / f"img_emb_{part}.npy", img[sl].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{part}.npy", txt[sl])
    return {"ids": paths, "nan": paths[4]}


def write_vector_column(root, n: int = 30) -> dict:
    """Parquet with a list<float> image vector column; one vector of the wrong dimension, one with inf, one
    null (the null one has a caption, but this run uses image vectors only)."""
    root.mkdir()
    img, labels = vectors(n, 12, 2)
    column = [list(map(float, v)) for v in img]
    column[5] = column[5][:7]
    column[6][0] = float("inf")
    column[7] = None
    ids = [f"item-{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "caption": [f"caption {i}" for i in range(n)], "label": labels,
                             "image_embedding": pa.array(column, pa.list_(pa.float32()))}), root / "part-0.parquet")
    return {"ids": ids, "short": ids[5], "inf": ids[6], "null": ids[7]}


def test_embeddings_readers(tmp_path):
    clip = write_clip_retrieval(tmp_path / "clip")
    fmt, why = detect(str(tmp_path / "clip"))
    assert fmt == "embeddings" and "img_emb/" in why and "text_emb/" in why
    _, t = read_all(str(tmp_path / "clip"), ArchiveConfig(label_column="label"))
    assert t.column("id").to_pylist() == clip["ids"]
    assert t.schema.field("image_feat").type == pa.list_(pa.float32(), 16)
    assert t.column("image_feat").null_count == 1 and t.column("text_feat").null_count == 0
    assert t.column("image_issue").to_pylist()[4] == "image: vector not finite (NaN or inf)"

    col = write_vector_column(tmp_path / "col")
    assert detect(str(tmp_path / "col"))[0] == "embeddings"
    _, t = read_all(str(tmp_path / "col"))
    issues = dict(zip(t.column("id").to_pylist(), t.column("image_issue").to_pylist()))
    assert issues[col["short"]] == "image: vector of dimension 7, expected 12"
    assert issues[col["inf"]] == "image: vector not finite (NaN or inf)"
    assert issues[col["null"]] is None and t.column("image_feat").null_count == 3


def test_corrupt_parquet_pages_are_named_in_every_parquet_format(tmp_path, items):
    """img2dataset and vector-column archives read their Parquet through the shards' batch reader: a bad page
    behind a valid footer fails that file, named, with the row the bad bytes start after."""
    from test_shards import _corrupt_page

    write_img2dataset(tmp_path / "i2d", items)
    write_vector_column(tmp_path / "col")
    for root, name in ((tmp_path / "i2d", "00001.parquet"), (tmp_path / "col", "part-0.parquet")):
        found = discover_input(str(root))
        path = root / name
        last = pq.read_metadata(path).num_columns - 1  # img2dataset's jpg, the vector column
        _corrupt_page(path, 0, last)
        with pytest.raises(ShardError, match=rf"{name}: unreadable Parquet data after row 0"):
            for s in found.shards:
                list(read_batches(s, None, rows_per_batch=7))


def test_vector_column_names():
    """auto: a vector column named for text (text, txt, caption: clip-retrieval's txt_emb) holds text vectors."""
    from raymmc.io.formats.embeddings import vector_columns

    vec = pa.list_(pa.float32())
    for image, text in (("img_emb", "txt_emb"), ("image_embedding", "caption_emb"), ("clip", "text_vec")):
        schema = pa.schema([("id", pa.string()), (image, vec), (text, vec)])
        assert vector_columns(schema, ArchiveConfig(), "f") == {"image": image, "text": text}


def test_npy_paired_by_folder_and_number(tmp_path):
    """Two clip-retrieval outputs under one input (both with a metadata_0): each metadata file gets the .npy files
    of its own folder."""
    write_clip_retrieval(tmp_path / "both" / "a", n=30)
    write_clip_retrieval(tmp_path / "both" / "b", n=20)
    found = discover_input(str(tmp_path / "both"))
    assert len(found.shards) == 4
    for s in found.shards:
        folder = s.path.rsplit("/metadata/", 1)[0]
        assert s.get("image_npy").startswith(f"{folder}/img_emb/") and s.get("text_npy").startswith(f"{folder}/")
    assert read_all(str(tmp_path / "both"))[1].num_rows == 50


def test_npy_object_arrays_are_refused(tmp_path):
    write_clip_retrieval(tmp_path / "clip")
    np.save(tmp_path / "clip" / "img_emb" / "img_emb_0.npy", np.array([{"a": 1}] * 15, dtype=object),
            allow_pickle=True)
    with pytest.raises(ShardError, match="object arrays are refused"):
        discover_input(str(tmp_path / "clip"))


@pytest.mark.slow
def test_embeddings_run_clip_retrieval(ray_session, tmp_path):
    clip = write_clip_retrieval(tmp_path / "clip")
    rundir = run_cli(str(tmp_path / "clip"), tmp_path, "clip", str(tmp_path / "cache"),
                     "--set", "archive.label_column=label")
    assigned, rejected = check_every_item_once(rundir, clip["ids"])
    assert rejected == {}  # the NaN image vector drops that view; the item keeps its text vector
    assert not assigned[clip["nan"]]["has_image"] and "not finite" in assigned[clip["nan"]]["note"]
    manifest = rundir.read_json("manifest.json")
    assert manifest["encoders"] == {"image": {"model": "precomputed", "dim": 16},
                                    "text": {"model": "precomputed", "dim": 8}}
    assert manifest["input_format"]["precomputed"] == ["image", "text"]
    assert rundir.read_json("metrics.json")["nmi"] > 0.9


@pytest.mark.slow
def test_embeddings_run_vector_column(ray_session, tmp_path):
    col = write_vector_column(tmp_path / "col")
    rundir = run_cli(str(tmp_path / "col"), tmp_path, "col", str(tmp_path / "cache"), *IMAGE_ONLY)
    assigned, rejected = check_every_item_once(rundir, col["ids"])
    assert rejected[col["short"]].startswith("image: vector of dimension 7, expected 12")
    assert rejected[col["inf"]].startswith("image: vector not finite")
    assert rejected[col["null"]] == "no image; caption present but this run does not use text"
    assert rundir.read_json("manifest.json")["encoders"]["image"] == {"model": "precomputed", "dim": 12}


def test_webdataset_compressed_tar(tmp_path, items):
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "00000.tar.gz", "w:gz") as tf:
        for key, img, cap, _ in items[:3]:
            add(tf, f"{key}.jpg", img)
            add(tf, f"{key}.txt", cap.encode())
    fmt, t = read_all(str(tmp_path / "gz"))
    assert fmt == "webdataset" and t.column("id").to_pylist() == [k for k, *_ in items[:3]]
    assert t.column("caption").to_pylist() == [c for _, _, c, _ in items[:3]]


def test_text_vectors_beside_image_bytes(tmp_path, items):
    """Parquet with image bytes and precomputed text vectors: the text view is the vectors, the image view is
    decoded and encoded as usual."""
    (tmp_path / "mixed").mkdir()
    txt, _ = vectors(4, 5, 3)
    pq.write_table(pa.table({"id": [k for k, *_ in items[:4]], "image": [img for _, img, _, _ in items[:4]],
                             "clip_text_embedding": pa.array(txt.tolist(), pa.list_(pa.float32(), 5))}),
                   tmp_path / "mixed" / "part-0.parquet")
    found = discover_input(str(tmp_path / "mixed"))
    assert found.format == "embeddings" and found.to_dict()["precomputed"] == ["text"]
    assert found.shards[0].columns == ("id", "image", "text_feat")
    _, t = read_all(str(tmp_path / "mixed"))
    assert t.column("image").to_pylist()[0] == items[0][1]
    assert np.allclose(np.array(t.column("text_feat").to_pylist()), txt)


def test_decode_batch_on_format_records(items):
    """The decode stage on a reader's records (no Ray): a source reject wins over everything, reader notes are
    kept, precomputed vectors stand for their view, and decodable images are hashed."""
    from raymmc.features.decode import DecodeConfig
    from raymmc.features.extract import decode_batch
    from raymmc.io.formats.embeddings import feat_array
    from raymmc.io.formats.records import records

    img = items[0][1]
    t = records(["a", "b", "c"], [img, img, None], ["x", "y", "z"], [None] * 3, "file", 0,
                notes={"reject": [None, "img2dataset status failed_to_download: 404", None],
                       "caption_issue": [None, None, "caption: not valid UTF-8 (byte 3); bad bytes replaced"]},
                vectors={"text_feat": feat_array(np.ones((3, 4), np.float32), np.array([True, True, False]))})
    out = decode_batch(t, DecodeConfig(image_size=32, resize=32))
    assert out["has_image"].tolist() == [True, False, False] and out["has_text"].tolist() == [True, False, False]
    assert out["image_note"][1] == out["caption_note"][1] == "img2dataset status failed_to_download: 404"
    assert out["caption_note"][2].startswith("caption: not valid UTF-8")
    assert out["image_hash"][0] is not None and out["image_hash"][2] is None
    assert out["text_feat"].shape == (3, 4) and out["pixels"].shape == (3, 32, 32, 3)


def test_readers_on_object_storage(s3_bucket, tmp_path, items):
    """The readers through the storage layer on an S3-compatible server: tar headers walked by seeking, COCO
    images beside the JSON, .npy rows read by range."""
    import boto3

    from raymmc.io.storage import StorageOptions

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    local = {"wds": write_webdataset(tmp_path / "wds", items), "coco": write_coco(tmp_path / "coco", items),
             "clip": write_clip_retrieval(tmp_path / "clip")}
    for name in local:
        for f in (tmp_path / name).rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), bucket, f"{name}/{f.relative_to(tmp_path / name)}")
    opts = StorageOptions(endpoint_url=endpoint)
    for name, fmt in (("wds", "webdataset"), ("coco", "coco"), ("clip", "embeddings")):
        found = discover_input(f"s3://{bucket}/{name}", opts)
        assert found.format == fmt
        t = pa.concat_tables([b for s in found.shards for b in read_batches(s, opts, 7)], promote_options="default")
        assert sorted(t.column("id").to_pylist()) == sorted(local[name]["ids"]), name
        assert all(s.startswith(f"s3://{bucket}/{name}/") for s in t.column("source").unique().to_pylist())


def test_auto_algorithm_on_vectors(tmp_path):
    """--algorithm auto: image vectors without captions have no pixels for MMDC: DEC on the vectors."""
    from raymmc.pipeline import choose_for_input

    (tmp_path / "v").mkdir()
    img, _ = vectors(6, 4, 0)
    pq.write_table(pa.table({"id": [str(i) for i in range(6)], "image_embedding": img.tolist()}),
                   tmp_path / "v" / "p.parquet")
    algorithm, why, view = choose_for_input(discover_input(str(tmp_path / "v")), None)
    assert (algorithm, view) == ("dec", "image") and "precomputed" in why


def test_duplicate_image_groups_kernel():
    """The per-partition kernel of the duplicate-image pass (no Ray): groups of 2+ rows per hash, ranked by input
    index, each row naming its group's first id."""
    from raymmc.train.duplicate_images import copies

    rows = pa.table({"id": ["c", "a", "b", "d", "e"], "image_hash": ["h1", "h1", "h2", "h1", "h3"],
                     "source": ["f"] * 5, "row": [2, 0, 1, 3, 4], "index": [2, 0, 1, 3, 4]})
    out = copies(rows).to_pylist()
    assert [(r["id"], r["rank"], r["first_id"], r["size"]) for r in out] == [("a", 0, "a", 3), ("c", 1, "a", 3),
                                                                            ("d", 2, "a", 3)]
