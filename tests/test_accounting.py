"""Every row is either usable or rejected with a reason; duplicates keep the first occurrence."""

import pyarrow as pa
import pytest

from raymmc.accounting import account, item_notes


def table(rows):
    keys = ["id", "source", "row", "has_image", "has_text", "image_note", "caption_note"]
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)})


ROWS = [
    ("a", "f0", 0, True, True, "", ""),
    ("b", "f0", 1, False, True, "image: corrupt (x)", ""),
    ("c", "f0", 2, True, False, "", "caption: empty"),
    ("d", "f0", 3, False, False, "image: zero bytes", "caption: empty"),
    ("a", "f1", 0, True, True, "", ""),
    (None, "f1", 1, True, True, "", ""),
    ("e", "f1", 2, False, False, "", ""),
]


def test_account_splits_and_explains():
    acc = account(table(ROWS))
    assert acc.usable.column("id").to_pylist() == ["a", "b", "c"]
    assert acc.usable.column("source").to_pylist() == ["f0"] * 3
    rejects = {(r["id"], r["source"], r["row"]): r["reason"] for r in acc.rejects.to_pylist()}
    assert rejects == {
        ("d", "f0", 3): "image: zero bytes; caption: empty",
        ("a", "f1", 0): "duplicate id: first seen in f0 row 0",
        (None, "f1", 1): "missing id",
        ("e", "f1", 2): "no image; no caption",
    }
    assert acc.duplicates == 1 and acc.missing_id == 1
    assert acc.usable.num_rows + acc.rejects.num_rows == len(ROWS)
    assert item_notes(acc.usable) == ["", "image: corrupt (x)", "caption: empty"]


def test_image_only_algorithms_reject_text_only_rows():
    acc = account(table(ROWS), modalities=frozenset({"image"}))
    assert acc.usable.column("id").to_pylist() == ["a", "c"]
    reasons = dict(zip(acc.rejects.column("id").to_pylist(), acc.rejects.column("reason").to_pylist()))
    assert reasons["b"] == "image: corrupt (x); caption present but this run does not use text"
    acc = account(table(ROWS), modalities=frozenset({"text"}))
    assert acc.usable.column("id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("rows_per_partition", [3, 1000], ids=["id-partitions", "one-task"])
def test_the_distributed_pass_equals_the_in_process_account(ray_session, tmp_path, rows_per_partition):
    """raymmc.train.usable (light columns hash-partitioned by id on Ray workers, or all in one task below one
    partition's worth; rejects written by the workers) keeps the same rows and rejects the same rows for the
    same reasons as account(), across files and partitions."""
    import pyarrow.parquet as pq

    import raymmc.train.usable as usable_mod
    from raymmc.train.usable import usable_rows

    rows = ROWS + [("a", "f2", 0, True, False, "", ""), ("f", "f2", 1, True, True, "", ""),
                   ("f", "f2", 2, False, False, "", ""), ("\x00bad", "f2", 3, True, True, "", "")]
    full = table(rows).append_column("label", pa.array(["x"] * len(rows)))
    files = []
    for src in ("f0", "f1", "f2"):
        part = full.filter(pa.compute.equal(full.column("source"), src))
        path = tmp_path / f"{src}.parquet"
        pq.write_table(part, path)
        files.append(str(path))
    expected = account(full)
    offsets = {"f0": 0, "f1": 100, "f2": 200}
    old = usable_mod.ROWS_PER_PARTITION
    usable_mod.ROWS_PER_PARTITION = rows_per_partition  # 3: several id partitions even on 11 rows
    try:
        got = usable_rows(files, None, modalities=frozenset({"image", "text"}), decode=None, offsets=offsets,
                          n_rows=len(rows), rejects_path=str(tmp_path / "rejects"), rejects_filesystem=None)
    finally:
        usable_mod.ROWS_PER_PARTITION = old
    kept = pa.concat_tables(ray_session.get(got.dataset.to_arrow_refs())).sort_by("index")
    assert kept.column("id").to_pylist() == expected.usable.column("id").to_pylist()
    assert kept.column("index").to_pylist() == [offsets[s] + r for s, r in zip(
        expected.usable.column("source").to_pylist(), expected.usable.column("row").to_pylist())]
    written = pq.read_table(tmp_path / "rejects").sort_by([("source", "ascending"), ("row", "ascending")])
    assert written.to_pylist() == expected.rejects.to_pylist()
    assert (got.usable, got.rejected, got.duplicates, got.missing_id) == (
        expected.usable.num_rows, expected.rejects.num_rows, expected.duplicates, expected.missing_id) == (4, 7, 3, 1)


def test_id_buckets_are_stable_and_null_safe():
    import zlib

    import pyarrow as pa

    from raymmc.train.usable import id_buckets

    ids = pa.chunked_array([pa.array(["a", None, "é/..", ""]), pa.array(["a"])])
    buckets = id_buckets(ids, 7)
    assert buckets == [zlib.crc32(b"a") % 7, -1, zlib.crc32("é/..".encode()) % 7, 0, zlib.crc32(b"a") % 7]
    assert id_buckets(pa.array(["a", "b"], pa.large_string()), 1) == [0, 0]


def test_the_duplicates_lookup_agrees_with_isin():
    """The duplicates are looked up by binary search in their sorted array (sorted once per worker); the answer
    is np.isin's, including an empty array and values beyond either end."""
    import numpy as np

    from raymmc.train.usable import _sorted_contains

    rng = np.random.default_rng(0)
    for n_dup in (0, 1, 7, 1000):
        dup = np.unique(rng.integers(0, 5000, n_dup))
        x = rng.integers(-10, 5010, 4096)
        np.testing.assert_array_equal(_sorted_contains(dup, x), np.isin(x, dup))
