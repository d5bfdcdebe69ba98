"""s3:// end to end on a real S3-compatible server (moto's server mode on 127.0.0.1): a deep algorithm reads its
shards, writes its feature cache, Ray Train checkpoints, run directory and report to the bucket; `assign` and
`--resume` read them back from there. No credential reaches any output. Then every stored file that is not
Parquet or JSON is replaced by a hostile pickle: nothing runs, and the errors name the refused files."""

import glob
import os
import pickle

import pytest
from conftest import by_id
from test_run_e2e import check_accounting

from raymmc.config import load_config
from raymmc.io import storage
from raymmc.io.rundir import RunDir
from raymmc.io.safestate import UnsafeStateError
from raymmc.io.storage import StorageOptions
from raymmc.pipeline import assign, resume, run

pytestmark = pytest.mark.slow

JECL = {"image_ae": {"epochs": 5}, "text_ae": {"epochs": 5},
        "cluster": {"max_iter": 60, "checkpoint_every": 1, "update_interval": 20}}


def _objects(prefix: str, opts: StorageOptions) -> list[storage.FileEntry]:
    return storage.list_files(prefix, "", opts)


@pytest.fixture(scope="module")
def s3_run(ray_session, bad_archive, s3_server):
    import uuid

    import boto3

    bucket = f"raymmc-e2e-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = StorageOptions(endpoint_url=s3_server)
    for f in storage.list_files(bad_archive["uri"]):
        storage.write_bytes(f"s3://{bucket}/in/{os.path.basename(f.path)}", open(f.path, "rb").read(), opts)
    cfg = load_config(values={"input": f"s3://{bucket}/in", "output": f"s3://{bucket}/runs", "run_name": "jecl",
                              "storage": {"endpoint_url": s3_server}, "extract": {"text": {"model": "tfidf"}},
                              "cluster": {"algorithm": "jecl", "clusters": 3, "params": {"jecl": JECL}}})
    lines: list[str] = []
    result = run(cfg, log=lines.append)
    return {"bucket": bucket, "opts": opts, "result": result, "log": lines, "endpoint": s3_server}


def test_everything_lands_in_the_bucket(s3_run, bad_archive):
    bucket, opts = s3_run["bucket"], s3_run["opts"]
    run_uri = f"s3://{bucket}/runs/jecl"
    assert s3_run["result"].run_uri == run_uri
    rundir = RunDir(run_uri, opts)
    check_accounting(rundir, bad_archive)
    names = {f.uri[len(run_uri) + 1:] for f in _objects(run_uri, opts)}
    assert {"manifest.json", "config.json", "metrics.json", "features.json", "model/state.safetensors",
            "report/index.html", "report/summary.png"} <= names
    assert any(n.startswith("train/jecl/checkpoint_") and n.endswith("/resume.safetensors") for n in names)
    manifest = rundir.read_json("manifest.json")
    assert all(f["uri"].startswith(f"s3://{bucket}/in/") for f in manifest["inputs"]["files"])
    assert rundir.read_json("metrics.json")["n_assigned"] == bad_archive["n_rows"] - 3  # dup, no id, nothing usable
    assert manifest["train"]["storage_path"] == f"{run_uri}/train" and manifest["train"]["experiment"] == "jecl"
    assert rundir.read_json("_RUN.json")["command"] == "run"  # the folder claimed by the conditional PUT
    cache = manifest["features"]["cache"]
    assert cache.startswith(f"s3://{bucket}/runs/features-cache/")
    assert storage.exists(f"{cache}/text_encoder.safetensors", opts)


def test_no_credential_reaches_any_output(s3_run, capfd):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 16  # distinctive, so that a match below means a leak
    bucket, opts = s3_run["bucket"], s3_run["opts"]
    for f in _objects(f"s3://{bucket}/runs", opts):  # manifest, config, report, checkpoints, feature cache
        assert secret.encode() not in storage.read_bytes(f.uri, opts), f.uri
    assert not any(secret in line for line in s3_run["log"])
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()  # every Ray worker's stdout/stderr of this session
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) < 50 * 2**20:
            with open(path, "rb") as fh:
                assert secret.encode() not in fh.read(), path


def test_assign_and_resume_from_s3(s3_run, bad_archive):
    bucket, opts = s3_run["bucket"], s3_run["opts"]
    run_uri = f"s3://{bucket}/runs/jecl"
    base = RunDir(run_uri, opts).read_table("assignments")
    again = assign(run_uri, f"s3://{bucket}/in", f"s3://{bucket}/assigned", run_name="same", storage_options=opts,
                   log=lambda _: None)
    same = RunDir(again.run_uri, opts).read_table("assignments")
    assert by_id(same) == by_id(base)
    features = again.manifest["features"]  # the run's features, read from its cache in the bucket
    assert features["files_extracted"] == 0 and features["files_reused"] == 3
    assert features["reused_cache"] == RunDir(run_uri, opts).read_json("manifest.json")["features"]["cache"]

    # Resuming the finished run: Ray Train restarts from its final checkpoint in the bucket and trains nothing.
    resumed = resume(run_uri, opts, log=lambda _: None)
    assert resumed.manifest["train"]["resumed"] == 1
    assert by_id(RunDir(run_uri, opts).read_table("assignments")) == by_id(base)  # written once, not twice


def test_planted_pickles_never_run(s3_run, tmp_path):
    """Runs last: it overwrites the run's files."""
    from test_safestate import hostile_pickle

    bucket, opts = s3_run["bucket"], s3_run["opts"]
    run_uri = f"s3://{bucket}/runs/jecl"
    cache = RunDir(run_uri, opts).read_json("manifest.json")["features"]["cache"]
    marker = tmp_path / "pwned"
    payload = hostile_pickle(str(marker))
    planted = [f.uri for prefix in (run_uri, cache) for f in _objects(prefix, opts)
               if not f.uri.endswith((".parquet", ".json"))]
    assert {p.rsplit("/", 1)[1] for p in planted} >= {"state.safetensors", "resume.safetensors",
                                                      "text_encoder.safetensors", "index.html"}
    originals = {p: storage.read_bytes(p, opts) for p in planted}
    for p in planted:
        storage.write_bytes(p, payload, opts)

    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/assigned"
    with pytest.raises(UnsafeStateError, match=rf"{cache}/text_encoder.safetensors: refused: a Python pickle"):
        assign(run_uri, inp, out, run_name="a1", storage_options=opts, log=lambda _: None)
    with pytest.raises(UnsafeStateError, match=rf"{run_uri}/train/jecl/checkpoint_[^/]+/resume.safetensors: refused"):
        resume(run_uri, opts, log=lambda _: None)
    # With a sound text encoder, assign reaches the model file, and refuses that.
    encoder = f"{cache}/text_encoder.safetensors"
    storage.write_bytes(encoder, originals[encoder], opts)
    with pytest.raises(UnsafeStateError, match=rf"{run_uri}/model/state.safetensors: refused: a Python pickle"):
        assign(run_uri, inp, out, run_name="a2", storage_options=opts, log=lambda _: None)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: had anything unpickled it, the marker would be there
    assert marker.exists()
