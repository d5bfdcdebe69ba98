"""Faults during extraction, each on a real local Ray cluster: the object store goes away for a few seconds, an
input file is deleted after discovery, an encoder actor is killed. After each, no row is lost or duplicated.
(A killed training worker and a killed driver are in test_train_ray.py.)"""

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import session_processes

from raymmc.config import load_config
from raymmc.features.extract import load_features, run_extraction
from raymmc.io import storage
from raymmc.io.shards import SCHEMA, discover
from raymmc.io.storage import StorageError, StorageOptions
from raymmc.pipeline import used_modalities

pytestmark = pytest.mark.slow

IMAGE_ONLY = ["extract.text.model=none", "cluster.kmeans.view=image", "extract.decode_batch_size=8",
              "extract.image.batch_size=8"]


def _archive(tux_items, n_files: int, rows: int = 8) -> pa.Table:
    n = n_files * rows
    return pa.table({"id": tux_items.ids[:n], "image": tux_items.images[:n], "caption": tux_items.captions[:n],
                     "label": tux_items.labels[:n]}, schema=SCHEMA)


def _local_archive(tux_items, root, n_files: int) -> list:
    """``n_files`` Parquet files of 8 real tuxpaint items under ``root``, discovered."""
    table = _archive(tux_items, n_files)
    root.mkdir()
    for i in range(n_files):
        pq.write_table(table.slice(i * 8, 8), root / f"part-{i:02d}.parquet")
    return discover(str(root))


def _extract(shards, cache, cfg, opts=None):
    return run_extraction(shards, cache, extract_cfg=cfg.extract, seed=cfg.seed, storage=opts or StorageOptions(),
                          has_gpu=False, log=lambda _: None, modalities=used_modalities(cfg))


def _each_row_once(dirs, opts, shards) -> None:
    table = load_features(dirs, opts, columns=["id"])
    keys = list(zip(table.column("source").to_pylist(), table.column("row").to_pylist()))
    assert len(keys) == len(set(keys)) == sum(s.rows for s in shards)


def _in_thread(extract) -> tuple[threading.Thread, dict]:
    """Run an extraction in a thread (the test meanwhile injects the fault); its dirs, stats or error land in
    the returned dict."""
    result: dict = {}

    def work():
        try:
            result["dirs"], result["stats"] = extract()
        except Exception as exc:  # surfaced by the test's assertions
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    return thread, result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_storage_outage_during_extraction(ray_session, tux_items, tmp_path):
    """The S3 server stops for 3 s mid-extraction and comes back: requests retry with backoff, the run completes."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="outage")
        opts = StorageOptions(endpoint_url=endpoint)
        table = _archive(tux_items, 8)
        for i in range(8):
            fs, path = storage.resolve(f"s3://outage/in/part-{i:03d}.parquet", opts)
            pq.write_table(table.slice(i * 8, 8), path, filesystem=fs)
        shards = discover("s3://outage/in", opts)
        cfg = load_config(overrides=IMAGE_ONLY)
        t_start = time.time()
        thread, result = _in_thread(lambda: _extract(shards, "s3://outage/cache", cfg, opts))
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive():  # wait until the first features are written
            try:
                if any("rows-" in f.path for f in storage.list_files("s3://outage/cache", ".parquet", opts)):
                    break
            except StorageError:
                pass
            time.sleep(0.2)
        assert thread.is_alive(), f"extraction ended before the outage: {result}"
        t_stop = time.time()
        server.stop()
        time.sleep(3)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        thread.join(600)
        print(f"outage at {t_stop - t_start:.1f}s, done {time.time() - t_stop:.1f}s after it")
        assert "error" not in result, result.get("error")
        assert result["stats"].files_extracted == 8
        _each_row_once(result["dirs"], opts, shards)
    finally:
        server.stop()


def test_input_file_deleted_after_discovery(ray_session, tux_items, tmp_path):
    root = tmp_path / "in"
    shards = _local_archive(tux_items, root, 3)
    os.remove(root / "part-01.parquet")
    cfg = load_config(overrides=IMAGE_ONLY)
    cache = str(tmp_path / "cache")
    with pytest.raises(StorageError, match=r"part-01.parquet: disappeared after the archive was listed"):
        _extract(shards, cache, cfg)
    shards = discover(str(root))  # the re-run sees the archive as it is now, and completes
    dirs, stats = _extract(shards, cache, cfg)
    assert stats.rows == 16
    _each_row_once(dirs, None, shards)


def test_killed_encoder_actor(ray_session, tux_items, tmp_path):
    """SIGKILL the image-encoder actor mid-run: Ray restarts it and retries its batches; the cache ends with
    every row exactly once."""
    shards = _local_archive(tux_items, tmp_path / "in", 16)
    cfg = load_config(overrides=IMAGE_ONLY + ["extract.max_actors=1"])
    cache = tmp_path / "cache"
    thread, result = _in_thread(lambda: _extract(shards, str(cache), cfg))
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and killed is None:
        if len(list(cache.rglob("rows-*.parquet"))) >= 2:
            actors = session_processes("ray::", "ImageEmbedder")
            if actors:
                killed = actors[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(600)
    assert killed is not None, "the extraction ended before an encoder actor could be killed"
    assert "error" not in result, result.get("error")
    _each_row_once(result["dirs"], None, shards)
    feats = load_features(result["dirs"], None, columns=["has_image", "image_feat"])
    assert np.asarray(feats.column("has_image").to_pylist()).all()  # no row lost its image to the kill
