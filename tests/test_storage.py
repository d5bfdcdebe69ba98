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


def test_a_writer_killed_mid_file_leaves_nothing_a_reader_sees(tmp_path):
    """A feature file's name claims its rows: a half-written one (a killed extraction) must never appear."""
    uri = str(tmp_path / "rows-000000000000-000000000009.parquet")

    def dies_mid_file(fs, path):
        with fs.open_output_stream(path) as f:
            f.write(b"PAR1 half a file")
        raise KeyboardInterrupt  # the process is killed here

    with pytest.raises(KeyboardInterrupt):
        storage._publish(uri, None, dies_mid_file)
    assert list(tmp_path.iterdir()) == []
    table = pa.table({"id": [str(i) for i in range(10)]})
    storage.write_parquet(uri, table)
    assert [p.name for p in tmp_path.iterdir()] == ["rows-000000000000-000000000009.parquet"]
    assert pq.read_table(uri).equals(table)


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
