"""Data-parallel training under Ray Train's TorchTrainer: a killed worker resumes from its checkpoint, an
interrupted `raymmc run` resumes, MMDC checkpoints per epoch. (1 vs N workers fitting the same model:
tests/test_train_ops.py on a gloo group, tests/test_real_archive.py under Ray Train on a real archive.)"""

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import session_processes
from sklearn.metrics import normalized_mutual_info_score as nmi

from raymmc.cluster.registry import make_clusterer
from raymmc.io import safestate
from raymmc.train.trainer import TrainConfig, exact_shards, fit_ray_train, table_to_multiview

pytestmark = pytest.mark.slow

PARAMS = {"image_ae": {"epochs": 15, "hidden": [64], "latent": 8}, "text_ae": {"epochs": 15, "hidden": [64], "latent": 8},
          "cluster": {"max_iter": 400, "update_interval": 10, "checkpoint_every": 2, "batch_size": 64}}


@pytest.fixture(scope="module")
def features():
    """Paired two-view features of 5 well-separated clusters, 20% of captions missing."""
    rng = np.random.default_rng(0)
    n, k = 400, 5
    y = np.arange(n) % k
    img = rng.normal(size=(k, 48))[y] * 3 + rng.normal(size=(n, 48))
    txt = rng.normal(size=(k, 24))[y] * 3 + rng.normal(size=(n, 24))
    has_text = rng.random(n) > 0.2
    txt[~has_text] = 0
    table = pa.table({
        "id": [f"i{i}" for i in range(n)],
        "image_feat": pa.FixedSizeListArray.from_arrays(pa.array(img.astype(np.float32).ravel()), 48),
        "text_feat": pa.FixedSizeListArray.from_arrays(pa.array(txt.astype(np.float32).ravel()), 24),
        "has_image": np.ones(n, bool), "has_text": has_text, "index": np.arange(n),
    })
    return table, y


def _fit(ray_session, table, workers, tmp_path, name):
    state, report = fit_ray_train(ray_session.data.from_arrow(table).materialize(), algorithm="jecl", clusters=5,
                                  params=PARAMS, seed=0, train=TrainConfig(workers=workers, max_failures=2),
                                  storage_path=str(tmp_path), run_name=name, has_gpu=False)
    model = make_clusterer("jecl", 5, PARAMS)
    model.load_state_dict(safestate.loads(state))
    return model.predict(table_to_multiview(table)), report


@pytest.mark.parametrize("world", [1, 3])
def test_exact_shards_cover_every_row_once_in_order(ray_session, world):
    from raymmc.raysession import ordered_execution

    # exact_shards takes the run's materialised, ordered dataset: materialised without preserve_order, the 4 blocks
    # may come back in any order (seen once as this worker's first test: rows 0, 1, 4, 5, ...)
    with ordered_execution():
        dataset = ray_session.data.range(10, override_num_blocks=4).materialize()
    shards = exact_shards(dataset, world)
    assert sorted(shards) == [f"train_{i}" for i in range(world)]
    parts = [[r["id"] for r in shards[f"train_{i}"].take_all()] for i in range(world)]
    assert sum(parts, []) == list(range(10))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="cannot be split over 11 workers"):
        exact_shards(ray_session.data.range(10), 11)


def test_killed_worker_resumes_from_checkpoint(ray_session, features, tmp_path):
    table, y = features
    result: dict = {}

    def train():
        try:
            result["labels"], result["report"] = _fit(ray_session, table, 2, tmp_path, "kill")
        except Exception as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    run_dir = tmp_path / "kill"
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and killed is None:
        # Kill once a third checkpoint is being written: the first ones are then registered with the controller
        # (the pretrained and initialised checkpoints come back to back; the third only after some training).
        if run_dir.exists() and sum(p.name.startswith("checkpoint") for p in run_dir.rglob("*") if p.is_dir()) >= 3:
            workers = session_processes("ray::RayTrainWorker")
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(600)
    assert killed is not None, "no checkpoint appeared before training ended"
    assert "error" not in result, result.get("error")
    assert result["report"]["resumed"] == 1  # the restarted workers continued from the checkpoint
    assert nmi(y, result["labels"]) > 0.9


def test_interrupted_run_resumes(ray_session, bad_archive, feature_cache, tmp_path):
    """`raymmc run` killed during training; `raymmc run --resume RUN` continues from the checkpoint. The killed
    driver is a job of this session's cluster (as under `ray job submit`): Ray ends its actors with it."""
    import json
    import sys
    from pathlib import Path

    from raymmc.cli import main

    repo = Path(__file__).resolve().parents[1]
    sets = ["cluster.algorithm=jecl", "cluster.clusters=3", "extract.text.model=tfidf",
            "cluster.params.jecl.cluster.max_iter=150", "cluster.params.jecl.cluster.checkpoint_every=1",
            "cluster.params.jecl.image_ae.epochs=6", "cluster.params.jecl.text_ae.epochs=6",
            "cluster.params.jecl.cluster.tol=0", "report=false", f"extract.cache={feature_cache}"]
    cmd = [sys.executable, "-m", "raymmc.cli", "run", "--input", bad_archive["uri"], "--output", str(tmp_path),
           "--run-name", "r"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    train_dir = tmp_path / "r" / "train" / "r"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if len(list(train_dir.glob("checkpoint_*/resume.safetensors"))) >= 2:
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be interrupted"
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.wait(30)
    assert not (tmp_path / "r" / "manifest.json").exists()

    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["train"]["resumed"] == 1
    assert manifest["counts"]["read"] == manifest["counts"]["assigned"] + manifest["counts"]["rejected"]
    assert manifest["features"]["files_extracted"] == 0  # features came from the cache


def test_mmdc_checkpoints_and_resumes_under_ray_train(ray_session, tmp_path):
    """MMDC on 2 workers writes epoch checkpoints; a resumed fit starts from the last one and completes."""
    from test_mmdc import shapes  # tiny real images of 3 shapes (tests/ is on sys.path under pytest)

    x, y = shapes(30)
    n = len(x)
    table = pa.table({
        "id": [f"p{i}" for i in range(n)],
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(n, -1).ravel()), x[0].size),
        "has_image": np.ones(n, bool), "has_text": np.zeros(n, bool), "index": np.arange(n)})
    params = {"backbone": "convnet", "epochs": 4, "batch_size": 16, "refine_epoch": 3, "lr_milestones": [],
              "rotation": False, "device": "cpu", "eval_crop": None, "crop_sizes": [24], "kmeans_nredo": 1,
              "convnet_widths": [8, 16, 16, 16], "checkpoint_every": 1}

    def fit(root, resume: bool):
        return fit_ray_train(ray_session.data.from_arrow(table).materialize(), algorithm="mmdc", clusters=3,
                             params=params, seed=0, train=TrainConfig(workers=2), storage_path=str(root),
                             run_name="mmdc", has_gpu=False, resume=resume)

    first, report = fit(tmp_path, resume=False)
    assert report["resumed"] == 0
    model = make_clusterer("mmdc", 3, params)
    model.load_state_dict(safestate.loads(first))
    assert len(model.predict(table_to_multiview(table))) == n
    # Epoch checkpoints (after epochs 1-3 of 4) and the final one were written; the run's storage keeps the newest
    # two (cluster checkpoints can be GBs): the last epoch's and the final one.
    assert len(list(tmp_path.joinpath("mmdc").rglob("resume.safetensors"))) == 2

    # As if the run had died right after its last epoch checkpoint (the final one not written): that
    # checkpoint alone in a run's storage, resumed on 2 workers.
    import shutil

    dirs = sorted({p.parent for p in tmp_path.joinpath("mmdc").rglob("resume.safetensors")}, key=lambda p: p.name)
    died = tmp_path / "died"
    shutil.copytree(dirs[-2], died / "mmdc" / dirs[-2].name)
    again, report = fit(died, resume=True)
    assert report["resumed"] == 1
    resumed = make_clusterer("mmdc", 3, params)
    resumed.load_state_dict(safestate.loads(again))
    # trained only the epoch after the checkpoint, its random streams restored
    assert {"phase": "resumed", "from": "epoch", "streams": "restored"} in resumed.history_
    assert [h["epoch"] for h in resumed.history_ if h["phase"] == "epoch"] == [0, 1, 2, 3]
    assert nmi(resumed.predict(table_to_multiview(table)), model.predict(table_to_multiview(table))) > 0.5

    # Resumed after it had finished: the final model is loaded, nothing is trained again (the history, which
    # carries each epoch's wall time, is the first run's).
    done, report = fit(tmp_path, resume=True)
    assert report["resumed"] == 1
    finished = make_clusterer("mmdc", 3, params)
    finished.load_state_dict(safestate.loads(done))
    assert finished.history_ == model.history_ and torch.equal(finished.targets_, model.targets_)
