"""Every row is either usable or rejected with a reason; duplicates keep the first occurrence."""

import pyarrow as pa

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
