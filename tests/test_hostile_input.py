"""Hostile input: each case is rejected with its reason, or bounded with a note, and never stops or escapes a run.

Fast cases (decode rules, run locations, non-finite encoder output) first; then one real run over an archive that
holds all the hostile rows at once (a 1 GB caption, a decompression bomb in each image format, ids built to break
paths, terminals and HTML, invalid UTF-8), and malformed Parquet files."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymmc.config import ConfigError, load_config
from raymmc.features.decode import DecodeConfig, clean_caption, decode_image, id_problem
from raymmc.io.rundir import RunDir, RunLocationError, check_run_location

BOMB_PIXELS = (9000, 8000)  # 72 MP: over the default max_pixels (64 MP), yet a few KB as PNG


def bomb(fmt: str) -> bytes:
    """A real image of BOMB_PIXELS in ``fmt``: small on disk, ~200 MB once decoded to RGB."""
    mode = "1" if fmt in ("PNG", "GIF", "TIFF", "BMP") else "L"  # the cheapest mode each encoder takes
    buf = io.BytesIO()
    Image.new(mode, BOMB_PIXELS).save(buf, format=fmt)
    return buf.getvalue()


FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")


@pytest.fixture(scope="module")
def bombs():
    return {fmt: bomb(fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompression_bomb_in_each_format_is_refused_before_decoding(bombs, fmt):
    arr, reason = decode_image(bombs[fmt], DecodeConfig())
    assert arr is None
    assert reason == "image: decompression bomb guard: 9000x8000 = 72000000 pixels exceeds max_pixels=64000000"


def test_huge_caption_is_cut_before_it_is_split():
    cfg = DecodeConfig(max_caption_chars=100)
    text, note = clean_caption("word " * 10_000, cfg)
    assert len(text) <= 100 and note == "caption: truncated from 50000 to 100 characters"
    text, note = clean_caption(b"\xff\xfe" + b"ab " * 10_000, cfg)  # bytes: decoded only as far as needed
    assert len(text) <= 100 and note.startswith("caption: truncated from 30002 bytes")
    assert clean_caption("short", cfg) == ("short", None)


def test_invalid_utf8_caption_is_kept_with_replacement_characters():
    assert clean_caption(b"caf\xe9 au lait", DecodeConfig()) == ("caf\ufffd au lait", None)


@pytest.mark.parametrize("id_,problem", [
    ("a/b/../../etc/passwd", None), ("..", None), ("<script>alert(1)</script>", None), ("ok id", None),
    ("", "missing id"), (None, "missing id"), ("nul\x00id", "id contains a control character (U+0000)"),
    ("tab\tid", "id contains a control character (U+0009)"), ("x" * 10_240, "id longer than max_id_chars=1024 "
                                                                             "(10240 characters)"),
    ("bad\ufffdutf8", "id is not valid UTF-8"),
])
def test_id_rules(id_, problem):
    assert id_problem(id_, DecodeConfig()) == problem


@pytest.mark.parametrize("output,name", [("runs", "../escape"), ("runs", "a/b"), ("runs", ".."), ("runs", "."),
                                         ("runs/../../etc", "r"), ("s3://bucket/runs/../other", "r"),
                                         ("runs", "x" * 200), ("runs", "-rf")])
def test_a_run_cannot_escape_its_output_prefix(output, name, tmp_path):
    with pytest.raises(RunLocationError):
        check_run_location(output, name)
    with pytest.raises(ConfigError, match="run name|output"):
        load_config(values={"output": output, "run_name": name})


def test_cli_refuses_an_escaping_run_name_before_any_work(tmp_path, capsys):
    from raymmc.cli import main

    assert main(["run", "--input", str(tmp_path), "--output", str(tmp_path), "--run-name", "../../x"]) == 2
    assert "run name '../../x'" in capsys.readouterr().err
    assert main(["assign", "--model", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path),
                 "--run-name", "../x"]) == 1
    assert "run name '../x'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_folder_belongs_to_one_run(where, tmp_path, request):
    """Two jobs given one --run-name must not mix their outputs in one folder: of writers racing for it exactly one
    wins, the others are refused naming the owner; default names get a suffix instead; an earlier run's folder
    without a claim (config.json) is refused too."""
    from concurrent.futures import ThreadPoolExecutor

    from raymmc.io.rundir import CLAIM_FILE, RunFolderTaken, open_run
    from raymmc.io.storage import StorageOptions

    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        output, opts = f"s3://{bucket}/runs", StorageOptions(endpoint_url=endpoint)
    else:
        output, opts = str(tmp_path / "runs"), None

    def claim(_):
        try:
            return open_run(output, "nightly", "unused", opts, command="run").uri
        except RunFolderTaken as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(claim, range(8)))
    won = [r for r in results if isinstance(r, str)]
    assert len(won) == 1 and won[0].endswith("/runs/nightly")
    assert all(isinstance(r, RunFolderTaken) and "`raymmc run` started" in str(r) and "--resume" in str(r)
               for r in results if not isinstance(r, str))
    assert RunDir(won[0], opts).read_json(CLAIM_FILE)["command"] == "run"

    # default names: same second, another suffix each
    names = [open_run(output, None, "kmeans-20261208-001530", opts, command="run").name for _ in range(3)]
    assert names == ["kmeans-20261208-001530", "kmeans-20261208-001530-2", "kmeans-20261208-001530-3"]

    # a folder written before claims existed
    RunDir(f"{output}/old", opts).write_json("config.json", {})
    with pytest.raises(RunFolderTaken, match="earlier run's config.json"):
        open_run(output, "old", "unused", opts, command="assign")
    # resuming: the folder the run already owns
    assert open_run(output, "nightly", "unused", opts, command="run", resuming=True).uri == won[0]


def test_runs_of_one_name_keep_apart_in_a_shared_checkpoint_folder(tmp_path, monkeypatch):
    from raymmc.pipeline import train_experiment

    monkeypatch.chdir(tmp_path)
    a, b = train_experiment("best", "runs/sweep-a/best"), train_experiment("best", "runs/sweep-b/best")
    assert a != b and a.startswith("best-") and b.startswith("best-")
    assert train_experiment("best", str(tmp_path / "runs/sweep-a/best")) == a  # the same folder written another way
    assert train_experiment("best", "s3://bkt/a/best/") == train_experiment("best", "s3://bkt/a/best")
    assert train_experiment("best", "s3://bkt/a/best") != train_experiment("best", "s3://bkt/b/best")


class _NaNEncoder:
    """A caption encoder whose output for some captions is not finite (a degenerate model or fp16 overflow)."""

    dim = 3

    def encode(self, texts):
        return np.array([[np.nan, 0, 0] if "bad" in t else [1.0, 2.0, 3.0] for t in texts], dtype=np.float32)


def test_non_finite_encoder_output_drops_that_view_with_a_note():
    from raymmc.features.extract import TextEmbedder

    batch = {"caption": np.array(["good", "bad", ""], dtype=object), "has_text": np.array([True, True, False]),
             "caption_note": np.array(["", "", ""])}  # a fixed-width array, as Ray can hand it over
    out = TextEmbedder(_NaNEncoder())(batch)
    assert out["has_text"].tolist() == [True, False, False]
    assert np.isfinite(out["text_feat"]).all() and out["text_feat"][1].tolist() == [0, 0, 0]
    assert out["caption_note"].tolist() == ["", "caption: encoder output not finite (NaN or inf)", ""]


# --- one real run over an archive of hostile rows ------------------------------------------------------------------

GIB = 2**30


def _string_array(values: list[bytes | None]) -> pa.Array:
    """A Parquet string column holding arbitrary bytes (other writers do not check UTF-8; pyarrow would)."""
    offsets, data, valid = [0], bytearray(), []
    for v in values:
        data += v or b""
        offsets.append(len(data))
        valid.append(v is not None)
    mask = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.large_string(), len(values),
                                 [mask, pa.py_buffer(np.array(offsets, np.int64)), pa.py_buffer(bytes(data))])


@pytest.fixture(scope="module")
def hostile_archive(tmp_path_factory, tux_items, bombs):
    root = tmp_path_factory.mktemp("hostile")
    labels = np.array(tux_items.labels)
    keep = [i for c in ("animals", "food", "town") for i in np.flatnonzero(labels == c)[:6]]
    ids = [tux_items.ids[i] for i in keep]
    images = [tux_items.images[i] for i in keep]
    captions = [tux_items.captions[i].encode() for i in keep]
    odd_ids = {"a/b/../../etc/passwd": "kept", "..": "kept", "<script>alert('id')</script>": "kept",
               "nul\x00id": "id contains a control character (U+0000)",
               "x" * 10_240: "id longer than max_id_chars=1024 (10240 characters)"}
    for k, (odd, _) in enumerate(odd_ids.items()):
        ids.append(odd)
        images.append(tux_items.images[keep[k]])
        captions.append(b"<b>bold</b> caption with an invalid byte \xff here")
    for fmt, data in bombs.items():
        ids.append(f"bomb-{fmt}")
        images.append(data)
        captions.append(tux_items.captions[keep[0]].encode())
    table = pa.table({"id": ids, "image": pa.array(images, pa.binary()), "caption": _string_array(captions)})
    pq.write_table(table, root / "part-0.parquet")
    # A 1 GB caption, built as one buffer (a Python str of it would cost several GB more), written without
    # dictionary or statistics (with them pyarrow takes 25 s and 8 GB to write it).
    huge = pa.py_buffer(b"caption " * (GIB // 8))
    big = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(np.array([0, GIB], np.int64)), huge])
    pq.write_table(pa.table({"id": ["huge-caption"], "image": pa.array([images[0]], pa.binary()), "caption": big}),
                   root / "part-1.parquet", compression="zstd", use_dictionary=False, write_statistics=False)
    return {"uri": str(root), "ids": ids + ["huge-caption"], "odd_ids": odd_ids}


@pytest.mark.slow
def test_hostile_archive_run(ray_session, hostile_archive, tmp_path):
    from raymmc.pipeline import run

    cfg = load_config(values={"input": hostile_archive["uri"], "output": str(tmp_path), "run_name": "hostile",
                              "cluster": {"clusters": 3}, "extract": {"text": {"model": "tfidf"}}})
    result = run(cfg, log=lambda _: None)
    rundir = RunDir(result.run_uri)
    assigned = {r["id"]: r for r in rundir.read_table("assignments").to_pylist()}
    rejects = {r["id"]: r["reason"] for r in rundir.read_table("rejects").to_pylist()}
    # Every row exactly once.
    assert len(assigned) + len(rejects) == len(hostile_archive["ids"]) == result.manifest["counts"]["read"]
    assert set(assigned) | set(rejects) == set(hostile_archive["ids"])
    for odd, fate in hostile_archive["odd_ids"].items():
        if fate == "kept":
            assert odd in assigned  # ids are data, never paths: kept exactly as written
        else:
            assert rejects[odd] == fate
    for fmt in FORMATS:  # the image is refused, the item is clustered on its caption
        row = assigned[f"bomb-{fmt}"]
        assert not row["has_image"] and row["has_text"] and "decompression bomb guard" in row["note"]
    huge = assigned["huge-caption"]
    assert huge["has_text"] and huge["note"] == f"caption: truncated from {GIB} bytes to 20000 characters"
    assert result.manifest["counts"]["caption_dropped"] == 0  # a cut caption is kept, not dropped
    page = rundir.read_bytes("report/index.html").decode()
    assert "<script>alert(" not in page and "<b>bold</b>" not in page  # ids and captions are escaped


def test_truncated_and_garbage_parquet_are_named(tmp_path):
    from raymmc.io.shards import ShardError, discover

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "caption": ["x", "y"]}), good)
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) - 10])
    with pytest.raises(ShardError, match="truncated.parquet: not a readable Parquet file"):
        discover(str(tmp_path))
    (tmp_path / "truncated.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(ShardError, match="truncated.parquet: not a readable Parquet file"):
        discover(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("text", ["tfidf", "minilm"])  # fitted on the driver first / read only in Ray Data tasks
def test_corrupt_page_behind_a_valid_footer_is_named(ray_session, tmp_path, text):
    """The footer reads (so the file passes discovery) but a data page does not: the error names the file."""
    from raymmc.features.extract import run_extraction
    from raymmc.io.shards import ShardError, discover
    from raymmc.io.storage import StorageOptions

    arch = tmp_path / "in"
    arch.mkdir()
    captions = [f"caption number {i} " * 20 for i in range(200)]
    pq.write_table(pa.table({"id": [str(i) for i in range(200)], "caption": captions}), arch / "ok.parquet")
    pq.write_table(pa.table({"id": [str(i) for i in range(200, 400)], "caption": captions}), arch / "bad.parquet",
                   compression="snappy")
    meta = pq.read_metadata(arch / "bad.parquet")
    col = meta.row_group(0).column(1)  # the caption column's first page
    raw = bytearray((arch / "bad.parquet").read_bytes())
    start = col.data_page_offset
    raw[start:start + 40] = b"\xde\xad\xbe\xef" * 10
    (arch / "bad.parquet").write_bytes(bytes(raw))
    shards = discover(str(arch))
    cfg = load_config(overrides=["extract.image.model=none", f"extract.text.model={text}"])
    with pytest.raises(ShardError, match=r"bad.parquet: unreadable Parquet data"):
        run_extraction(shards, str(tmp_path / "cache"), extract_cfg=cfg.extract, seed=0, storage=StorageOptions(),
                       has_gpu=False, modalities=frozenset({"text"}), log=lambda _: None)
