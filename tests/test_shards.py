"""The shard contract: bad schemas and empty/missing inputs fail with the file and the problem named."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymmc.io.shards import ShardError, conform, discover
from raymmc.io.storage import StorageError


def write(path, **cols):
    pq.write_table(pa.table(cols), path)


def test_good_archive_with_heterogeneous_files(tmp_path):
    write(tmp_path / "a.parquet", id=["1"], image=pa.array([b"x"], pa.binary()))
    write(tmp_path / "b.parquet", id=["2"], caption=["c"], label=[3])
    shards = discover(str(tmp_path))
    assert [s.rows for s in shards] == [1, 1]
    assert shards[0].columns == ("id", "image") and shards[1].columns == ("id", "caption", "label")


@pytest.mark.parametrize("cols,match", [
    (dict(image=pa.array([b"x"], pa.binary())), r"missing required column\(s\) \['id'\]"),
    (dict(id=["1"], label=["a"]), "needs an 'image' or a 'caption' column"),
    (dict(id=[1], caption=["c"]), "column 'id' has type int64, expected string"),
    (dict(id=["1"], image=["not-binary"]), "column 'image' has type string, expected binary"),
    (dict(id=["1"], caption=[1.5]), "column 'caption' has type double, expected string"),
])
def test_wrong_schema_names_the_file(tmp_path, cols, match):
    write(tmp_path / "good.parquet", id=["0"], caption=["fine"])
    write(tmp_path / "bad.parquet", **cols)
    with pytest.raises(ShardError, match=match) as err:
        discover(str(tmp_path))
    assert "bad.parquet" in str(err.value)


def test_not_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="x.parquet: not a readable Parquet file"):
        discover(str(tmp_path))


def test_empty_and_missing_inputs(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        discover(str(tmp_path / "missing"))
    with pytest.raises(ShardError, match="no .parquet files"):
        discover(str(tmp_path))
    write(tmp_path / "e.parquet", id=pa.array([], pa.string()), caption=pa.array([], pa.string()))
    with pytest.raises(ShardError, match="all 1 Parquet file\\(s\\) are empty"):
        discover(str(tmp_path))


def test_conform_adds_missing_columns_as_null():
    t = conform(pa.table({"id": ["1"], "label": pa.array([7])}), ["id", "image", "caption", "label"])
    assert t.column_names == ["id", "image", "caption", "label"]
    assert t.column("image").null_count == 1 and t.column("label").to_pylist() == ["7"]


def _corrupt_page(path, row_group: int, column: int) -> None:
    """Overwrite the start of one column chunk's first data page: the footer still reads."""
    col = pq.read_metadata(path).row_group(row_group).column(column)
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset:col.data_page_offset + 40] = b"\xde\xad\xbe\xef" * 10
    path.write_bytes(bytes(raw))


def test_parquet_batches_offsets_columns_and_failures(tmp_path):
    """The one Parquet batch reader of every Parquet-based input format: the first row of each batch, the columns
    picked from the schema, and a failure named for what it is (bad bytes after a row, or the file gone)."""
    import os

    from pyarrow import fs as pafs

    from raymmc.io.shards import parquet_batches

    path = tmp_path / "a.parquet"
    captions = [f"caption {i} " * 20 for i in range(30)]
    pq.write_table(pa.table({"id": [str(i) for i in range(30)], "caption": captions}), path, row_group_size=10)
    local = pafs.LocalFileSystem()
    got = list(parquet_batches("file://a", local, str(path), 4, lambda schema: [n for n in schema.names if n == "id"]))
    assert [o for o, _ in got] == list(range(0, 30, 4))
    assert all(t.column_names == ["id"] for _, t in got)
    assert [i for _, t in got for i in t.column("id").to_pylist()] == [str(i) for i in range(30)]

    _corrupt_page(path, 2, 1)  # the third row group's captions: rows 0-19 read, then the bad page
    with pytest.raises(ShardError, match=r"file://a: unreadable Parquet data after row 20"):
        list(parquet_batches("file://a", local, str(path), 10, lambda schema: schema.names))
    os.remove(path)
    with pytest.raises(StorageError, match=r"file://a: disappeared after the archive was listed"):
        list(parquet_batches("file://a", local, str(path), 10, lambda schema: schema.names))
