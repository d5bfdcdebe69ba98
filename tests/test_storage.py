"""Storage URIs against the local disk and a real S3-compatible server on 127.0.0.1."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymmc.io import storage
from raymmc.io.storage import StorageError, StorageOptions


def test_local_roundtrip_and_listing(tmp_path):
    storage.write_json(str(tmp_path / "a" / "x.json"), {"k": 1})
    storage.write_bytes(f"file://{tmp_path}/a/b/y.parquet", b"123")
    storage.write_bytes(str(tmp_path / "a" / "_hidden.parquet"), b"")
    assert storage.read_json(str(tmp_path / "a" / "x.json")) == {"k": 1}
    files = storage.list_files(str(tmp_path / "a"))
    assert [f.size for f in files] == [3]
    assert files[0].uri.endswith("a/b/y.parquet")


def test_a_writer_killed_mid_file_leaves_nothing_a_reader_sees(tmp_path, monkeypatch):
    """A feature file's name claims its rows: a half-written one (a killed extraction) must never appear."""
    import os

    uri = str(tmp_path / "rows-000000000000-000000000009.parquet")
    table = pa.table({"id": [str(i) for i in range(10)]})

    def killed(src, dst):  # the process dies after writing the bytes, before the rename publishes them
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            storage.write_parquet(uri, table)
    assert list(tmp_path.iterdir()) == []
    storage.write_parquet(uri, table)
    assert [p.name for p in tmp_path.iterdir()] == ["rows-000000000000-000000000009.parquet"]
    assert pq.read_table(uri).equals(table)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_that_fails_leaves_no_file(where, tmp_path, request):
    """A table that cannot be written (Parquet has no month-day-nano interval) fails before anything is
    published. Written as a stream, the object store committed the empty object when the writer closed it, and
    its name claimed rows it did not hold."""
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        opts, root = StorageOptions(endpoint_url=endpoint), f"s3://{bucket}/cache"
    else:
        opts, root = None, str(tmp_path)
    storage.write_bytes(f"{root}/keep.json", b"{}", opts)
    bad = pa.table({"x": pa.array([(1, 2, 3)], pa.month_day_nano_interval())})
    with pytest.raises(pa.ArrowNotImplementedError):
        storage.write_parquet(f"{root}/rows-000000000000-000000000000.parquet", bad, opts)
    assert [f.uri.rsplit("/", 1)[1] for f in storage.list_files(root, "", opts)] == ["keep.json"]


def test_one_object_store_client_per_settings_and_listings_never_stale(s3_bucket):
    """The S3 client is made once per store settings (not once per call); it caches no listing, so a file written
    by another process (a Ray worker) shows up in the next listing."""
    import s3fs

    endpoint, bucket = s3_bucket
    opts = StorageOptions(endpoint_url=endpoint)
    uri = f"s3://{bucket}/features"
    assert storage.resolve(uri, opts)[0] is storage.resolve(f"{uri}/x", StorageOptions(endpoint_url=endpoint))[0]
    assert storage.resolve(uri, opts)[0] is not storage.resolve(uri, StorageOptions(endpoint_url=endpoint,
                                                                                    retries=3))[0]
    storage.write_bytes(f"{uri}/a.parquet", b"1", opts)
    assert [f.uri for f in storage.list_files(uri, ".parquet", opts)] == [f"{uri}/a.parquet"]
    other = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    other.pipe_file(f"{bucket}/features/b.parquet", b"2")
    assert [f.uri for f in storage.list_files(uri, ".parquet", opts)] == [f"{uri}/a.parquet", f"{uri}/b.parquet"]


def test_missing_local_input_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_files(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope.json"))


def test_unknown_scheme():
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        storage.resolve("ftp://host/x")


def test_s3_roundtrip_through_pyarrow(s3_bucket):
    endpoint, bucket = s3_bucket
    opts = StorageOptions(endpoint_url=endpoint)
    uri = f"s3://{bucket}/archive"
    fs, path = storage.resolve(uri + "/part-0.parquet", opts)
    pq.write_table(pa.table({"id": ["a", "b"]}), path, filesystem=fs)
    storage.write_json(f"{uri}/meta.json", {"n": 2}, opts)
    files = storage.list_files(uri, ".parquet", opts)
    assert [f.uri for f in files] == [f"s3://{bucket}/archive/part-0.parquet"]
    assert files[0].size > 0
    assert pq.read_table(files[0].path, filesystem=fs).column("id").to_pylist() == ["a", "b"]
    assert storage.read_json(f"{uri}/meta.json", opts) == {"n": 2}
    assert storage.exists(f"{uri}/meta.json", opts) and not storage.exists(f"{uri}/nope", opts)


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.write_bytes(f"s3://{bucket}/k", b"v")
    assert storage.read_bytes(f"s3://{bucket}/k") == b"v"


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.list_files("s3://no-such-bucket/x", options=StorageOptions(endpoint_url=s3_server))


def test_unreachable_s3_endpoint_is_a_clear_error():
    # Nothing listens on the discard port; one attempt (the default retries ride out an outage for a minute).
    opts = StorageOptions(endpoint_url="http://127.0.0.1:9", retries=1)
    with pytest.raises(StorageError, match="s3://bucket/x"):
        storage.list_files("s3://bucket/x", options=opts)


def test_in_threads_keeps_order_and_raises_the_first_error_in_item_order():
    import threading
    import time

    seen = set()

    def slow_square(i):
        seen.add(threading.get_ident())
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        return i * i

    assert storage.in_threads(slow_square, list(range(20)), threads=8) == [i * i for i in range(20)]
    assert len(seen) > 1  # really concurrent

    def fails(i):
        time.sleep(0.02 if i == 3 else 0.0)  # item 3 fails last in time, but first in order
        if i in (3, 7):
            raise StorageError(f"item {i}")
        return i

    with pytest.raises(StorageError, match="item 3"):
        storage.in_threads(fails, list(range(10)), threads=8)
