"""The feature cache: a killed extraction resumes without redoing finished files, and gives the
same features as an uninterrupted one."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raymmc.config import load_config
from raymmc.features.extract import (DONE_FILE, ShardDatasource, feature_matrix, fingerprint, load_features,
                                     mark_done, probe_files, run_extraction, stage_times)
from raymmc.io.shards import discover
from raymmc.io.storage import StorageOptions
from raymmc.pipeline import used_modalities

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, tux_items):
    """128 real tuxpaint items in 16 shards of 8."""
    import pyarrow as pa

    from raymmc.io.shards import SCHEMA

    root = tmp_path_factory.mktemp("shards16")
    n = 128
    table = pa.table({"id": tux_items.ids[:n], "image": tux_items.images[:n], "caption": tux_items.captions[:n],
                      "label": tux_items.labels[:n]}, schema=SCHEMA)
    for i in range(16):
        pq.write_table(table.slice(i * 8, 8), root / f"part-{i:05d}.parquet")
    return str(root)


def _extract(shards, cache, cfg):
    return run_extraction(shards, cache, extract_cfg=cfg.extract, seed=cfg.seed, storage=StorageOptions(),
                          has_gpu=False, log=lambda _: None, modalities=used_modalities(cfg))


def _complete(root, shard) -> bool:
    return probe_files(root, [shard], None)[0][0] is not None


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the extraction driver and every process of its session (its Ray workers belong to the test
    session's cluster, which ends the dead job's actors)."""
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
    proc.wait(timeout=30)


def test_killed_extraction_resumes(ray_session, many_shards, tmp_path):
    # Image features only: the kill must land while some files are written and others are not, and
    # a text stage (its actor's start-up) only delays the first output files.
    sets = ["extract.text.model=none", "extract.decode_batch_size=8", "extract.image.batch_size=8",
            "cluster.kmeans.view=image"]
    cfg = load_config(overrides=sets)
    shards = discover(many_shards)
    cache = str(tmp_path / "cache")
    root = f"{cache}/{fingerprint(cfg.extract, shards, cfg.seed, used_modalities(cfg))}"

    # The killed driver is a job of this session's cluster (as under `ray job submit`): Ray ends its actors with it,
    # and no second cluster starts.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAYMMC_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raymmc.cli", "extract", "--input", many_shards, "--output", cache]
        + [a for s in sets for a in ("--set", s)],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(_complete(root, s) for s in shards):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        _kill_session(proc)
    done_before = [s for s in shards if _complete(root, s)]
    assert 0 < len(done_before) < len(shards), "the kill must land mid-run"
    mtimes = {p: p.stat().st_mtime_ns for s in done_before for p in Path(root, s.key).rglob("rows-*.parquet")}
    killed_attempt = {Path(probe_files(root, [s], None)[0][0]).name for s in done_before}
    assert len(killed_attempt) == 1 and not any(Path(root, s.key, DONE_FILE).exists() for s in shards)

    dirs, stats = _extract(shards, cache, cfg)
    assert stats.files_cached == len(done_before)
    assert stats.files_extracted == len(shards) - len(done_before)
    # A summary per stage of the job, over the rows of the files extracted this time.
    names = [st["stage"] for st in stats.stages]
    assert any("decode_batch" in n for n in names) and any("ImageEmbedder" in n for n in names), names
    todo_rows = sum(s.rows for s in shards if s not in done_before)
    assert all(st["rows"] == todo_rows and st["seconds"] > 0 for st in stats.stages)
    # Finished files were not extracted again: their feature files are untouched.
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # The killed run's finished files were adopted and marked; the rest are in this run's folders.
    assert all(probe_files(root, [s], None)[0][1] for s in shards)
    assert {Path(d).name for d, s in zip(dirs, shards) if s in done_before} == killed_attempt
    assert killed_attempt.isdisjoint(Path(d).name for d, s in zip(dirs, shards) if s not in done_before)

    # Identical to an uninterrupted extraction into a fresh cache.
    clean_dirs, _ = _extract(shards, str(tmp_path / "clean"), cfg)
    resumed, clean = load_features(dirs), load_features(clean_dirs)
    assert resumed.column("id").to_pylist() == clean.column("id").to_pylist() == [
        i for s in shards for i in pq.read_table(s.path, columns=["id"]).column("id").to_pylist()]
    np.testing.assert_allclose(feature_matrix(resumed, "image_feat"), feature_matrix(clean, "image_feat"),
                               rtol=1e-4, atol=1e-5)

    # A third run extracts nothing.
    _, again = _extract(shards, cache, cfg)
    assert again.files_extracted == 0 and again.files_cached == len(shards) and again.stages == []


def test_stage_times_from_ray_data_stats():
    text = (
        "Operator 0 Input: 0 tasks executed, 0 blocks produced in 0s\n"
        "Operator 1 ReadShard->MapBatches(decode_batch): 8 tasks executed, 8 blocks produced in 2.5s\n"
        "* Remote wall time: 85.91ms min, 669.14ms max, 195.1ms mean, 1.56s total\n"
        "Operator 2 MapBatches(ImageEmbedder): 8 tasks executed, 8 blocks produced in 12.8s\n")
    stages = stage_times(text, 512)
    assert [st["stage"] for st in stages] == ["Input", "ReadShard->MapBatches(decode_batch)",
                                              "MapBatches(ImageEmbedder)"]
    assert stages[0]["items_per_s"] is None  # 0 s: no rate rather than a division by zero
    assert stages[1]["items_per_s"] == pytest.approx(512 / 2.5) and stages[2]["seconds"] == 12.8
    assert stage_times("a format this parser does not know", 10) == []


def test_one_read_task_per_file_with_provenance(many_shards):
    # Files must reach Ray Data as separate read tasks: handed over as one bundle, they were read and decoded
    # one after another in a single task.
    shards = discover(many_shards)
    tasks = ShardDatasource(shards, StorageOptions(), rows_per_batch=3).get_read_tasks(parallelism=1)
    assert len(tasks) == len(shards) == 16
    for shard, task in zip(shards, tasks):
        assert task.metadata.num_rows == shard.rows == 8 and task.metadata.input_files == (shard.uri,)
        blocks = list(task())
        assert [b.num_rows for b in blocks] == [3, 3, 2]  # streamed in row batches, not the whole file at once
        rows = [r for b in blocks for r in b.column("row").to_pylist()]
        assert rows == list(range(8))
        assert {s for b in blocks for s in b.column("source").to_pylist()} == {shard.uri}
        ids = [i for b in blocks for i in b.column("id").to_pylist()]
        assert ids == pq.read_table(shard.path, columns=["id"]).column("id").to_pylist()


def test_fingerprint_tracks_what_changes_features(many_shards):
    shards = discover(many_shards)
    both = frozenset({"image", "text"})
    base = load_config()
    fp = fingerprint(base.extract, shards, 0, both)
    assert fingerprint(load_config(overrides=["extract.image.batch_size=7"]).extract, shards, 0, both) == fp
    assert fingerprint(load_config(overrides=["extract.image.model=resnet18"]).extract, shards, 0, both) != fp
    assert fingerprint(base.extract, shards, 1, both) == fp  # MiniLM is pretrained: seed-free
    assert fingerprint(base.extract, shards[:5], 0, both) == fp  # ...and archive-free
    d2v = load_config(overrides=["extract.text.model=doc2vec"]).extract
    assert fingerprint(d2v, shards, 0, both) != fingerprint(d2v, shards[:5], 0, both)  # fitted on the archive
    assert fingerprint(d2v, shards, 0, both) != fingerprint(d2v, shards, 1, both)


def test_a_cache_folder_short_of_its_rows_is_an_error_not_a_loss(ray_session, many_shards, tmp_path):
    """A finished folder (its _DONE.json written) that lost a feature file: the run stops naming the folder, never
    clusters fewer rows than the input has; once the folder is deleted, only that file is extracted again."""
    import shutil

    shards = discover(many_shards)
    cfg = load_config(overrides=["extract.image.model=none", "extract.text.model=tfidf"])
    cache = str(tmp_path / "cache")
    dirs, stats = _extract(shards, cache, cfg)
    assert stats.rows == 128
    victim = Path(dirs[3])
    assert (victim.parent / DONE_FILE).is_file()
    for f in victim.glob("rows-*.parquet"):
        f.unlink()
        break
    with pytest.raises(RuntimeError, match=rf"{victim}.*holds \d rows of its input file's 8.*changed after it was "
                                           "written. Delete that folder"):
        _extract(shards, cache, cfg)
    shutil.rmtree(victim)
    encoder = victim.parent.parent / "text_encoder.safetensors"  # fitted on the archive by the first run
    stamp = encoder.stat().st_mtime_ns
    dirs, stats = _extract(shards, cache, cfg)
    assert encoder.stat().st_mtime_ns == stamp  # reused, not fitted again: one encoder for every file's captions
    assert stats.rows == 128 and stats.files_extracted == 1 and stats.files_cached == 15
    assert probe_files(str(victim.parent.parent), [shards[3]], None) == [(dirs[3], True)]  # the new folder marked


def _feature_file(folder: Path, first: int, last: int, age_s: float = 0.0) -> Path:
    """A feature file (a real Parquet) named for rows first..last, last written ``age_s`` ago."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"rows-{first:012d}-{last:012d}.parquet"
    pq.write_table(pa.table({"row": list(range(first, last + 1))}), f)
    t = time.time() - age_s
    os.utime(f, (t, t))
    os.utime(folder, (t, t))
    return f


def test_probe_adopts_marks_and_sweeps_attempt_folders(many_shards, tmp_path):
    """Each run writes a file's features into a folder of its own. The probe reads the folder _DONE.json names,
    adopts a folder that holds every row without a mark (a killed run's), ignores partial ones, and deletes a
    partial folder only once nothing has written to it for the stale age; a complete folder is never deleted (a
    run may be reading it). The first mark wins, and a run that finished second switches to the marked folder."""
    shards = discover(many_shards)[:5]  # 8 rows each
    root = tmp_path / "fp"
    day = 24 * 3600
    a, b, c, d, e = (root / s.key for s in shards)
    # a: marked folder "old" (older than the stale age: kept, it is the marked one), a dead partial, a live one,
    # and an old complete one (a run that lost the race to mark: kept, it may still be read)
    _feature_file(a / "old", 0, 7, age_s=3 * day)
    (a / DONE_FILE).write_text('{"attempt": "old", "rows": 8}')
    _feature_file(a / "dead", 0, 3, age_s=2 * day)
    _feature_file(a / "live", 0, 3, age_s=60)
    _feature_file(a / "loser", 0, 7, age_s=2 * day)
    # b: a killed run wrote every row in two files without marking; a dead empty folder and a stray file beside it
    _feature_file(b / "killed", 0, 3, age_s=2 * day)
    _feature_file(b / "killed", 4, 7, age_s=2 * day)
    (b / "killed" / "rows-1-x.parquet").write_bytes(b"not ours")
    (b / "empty").mkdir()
    os.utime(b / "empty", (time.time() - 2 * day,) * 2)
    # c: only partial folders (a gap: rows 4-5 missing), one dead; d: nothing at all
    _feature_file(c / "gap", 0, 3, age_s=60)
    _feature_file(c / "gap", 6, 7, age_s=60)
    _feature_file(c / "dead", 0, 3, age_s=2 * day)
    # e: a file of a cache written before attempt folders (its rows under the key, a mark without an attempt)
    _feature_file(e, 0, 7, age_s=3 * day)
    (e / DONE_FILE).write_text('{"uri": "x", "rows": 8, "size": 1}')

    expected = [(str(a / "old"), True), (str(b / "killed"), False), (None, False), (None, False), (str(e), True)]
    # Only read (a reused cache): nothing deleted.
    assert probe_files(str(root), shards, None) == expected
    assert (a / "dead").exists() and (c / "dead").exists()
    # Sweeping: the dead partial folders go; the marked, adopted, complete and live ones stay.
    assert probe_files(str(root), shards, None, stale_s=day) == expected
    assert sorted(p.name for p in a.iterdir()) == [DONE_FILE, "live", "loser", "old"]
    assert sorted(p.name for p in b.iterdir()) == ["killed"]
    assert sorted(p.name for p in c.iterdir()) == ["gap"]
    assert sorted(p.name for p in e.iterdir()) == [DONE_FILE, "rows-000000000000-000000000007.parquet"]

    # A mark naming a folder that is gone, another row count, or not a mark at all, is no mark...
    for text in ('{"attempt": "gone", "rows": 8}', '{"attempt": "gap", "rows": 9}', "{not json", "[1]"):
        (c / DONE_FILE).write_text(text)
        assert probe_files(str(root), shards[2:3], None) == [(None, False)]
    _feature_file(c / "redone", 0, 7)  # ...and the run that extracts the file again replaces it
    assert mark_done(str(root), shards[2:3], [str(c / "redone")], None) == [str(c / "redone")]
    assert probe_files(str(root), shards[2:3], None) == [(str(c / "redone"), True)]

    # The first mark wins: a second run that finished the same file reads the marked folder from then on.
    assert mark_done(str(root), shards[1:2], [str(b / "killed")], None) == [str(b / "killed")]
    _feature_file(b / "second", 0, 7)
    assert mark_done(str(root), shards[1:2], [str(b / "second")], None) == [str(b / "killed")]
    assert probe_files(str(root), shards[1:2], None) == [(str(b / "killed"), True)]


def test_a_run_beside_another_writing_the_same_file(ray_session, many_shards, tmp_path, monkeypatch):
    """Another run sharing the cache is writing one of the files (its folder holds part of the rows, written just
    now): this run neither reads, clears nor finishes that folder; it extracts the file into its own and marks it.
    (Files are probed and marked 5 to a Ray task here, as 256 are on a large archive.)"""
    from raymmc.features import extract

    monkeypatch.setattr(extract, "PROBE_FILES", 5)
    shards = discover(many_shards)
    cfg = load_config(overrides=["extract.image.model=none", "extract.text.model=tfidf"])
    cache = tmp_path / "cache"
    root = cache / fingerprint(cfg.extract, shards, cfg.seed, used_modalities(cfg))
    other = _feature_file(root / shards[5].key / "19700101T000000Z-other", 0, 2)
    dirs, stats = _extract(shards, str(cache), cfg)
    assert stats.rows == 128 and stats.files_extracted == 16
    assert other.exists() and [p.name for p in other.parent.iterdir()] == [other.name]
    assert Path(dirs[5]).parent == other.parent.parent and Path(dirs[5]) != other.parent
    assert str(Path(dirs[5]).name) in (root / shards[5].key / DONE_FILE).read_text()
    table = load_features(dirs, columns=["id"])
    assert table.num_rows == 128 and len(set(zip(table.column("source").to_pylist(),
                                                 table.column("row").to_pylist()))) == 128
