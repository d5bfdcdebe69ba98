"""The training engine of the deep algorithms: the lock-step sampler, derived seeds and the checkpoint
protocol. Every algorithm resumes bit-identically from each of its checkpoint phases, and two DDP workers
on uneven shards (30 and 34 rows) finish every algorithm with one model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raymmc.cluster.base import LOCAL, MultiViewData
from raymmc.cluster.protocols import mixed_modal
from raymmc.cluster.registry import make_clusterer
from raymmc.cluster.base import GlobalOps
from raymmc.cluster.sampler import EpochSampler, steps_per_epoch
from raymmc.cluster.seeding import Stream, derive_seed
from raymmc.io import safestate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ sampler, seeds
def test_sampler_uses_every_row_once_per_epoch_with_the_same_steps_on_uneven_shards():
    steps = math.ceil(max(30, 34) / 8)
    samplers = [EpochSampler(n, steps, np.random.default_rng(n)) for n in (30, 34)]
    for s, n in zip(samplers, (30, 34)):
        for _ in range(3):  # epochs
            batches = [s.next() for _ in range(steps)]
            assert sorted(np.concatenate(batches).tolist()) == list(range(n))
            sizes = [len(b) for b in batches]
            assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 8
        assert s.epoch == 2


def test_sampler_state_round_trip_continues_the_same_batches():
    a = EpochSampler(50, 4, np.random.default_rng(1))
    for _ in range(7):
        a.next()
    state = safestate.loads(safestate.dumps({"s": a.state_dict()}))["s"]
    expect = [a.next() for _ in range(6)]
    b = EpochSampler(50, 4, np.random.default_rng(999))  # another generator: the state replaces it
    b.load_state_dict(state)
    for e, got in zip(expect, (b.next() for _ in range(6))):
        np.testing.assert_array_equal(e, got)


def test_sampler_refuses_a_shard_too_small_for_its_steps():
    with pytest.raises(ValueError, match="3 rows, too few for 2 batches of at least 2"):
        EpochSampler(3, 2, np.random.default_rng(0), min_batch=2)
    empty = EpochSampler(0, 3, np.random.default_rng(0))  # a worker without rows still takes every step
    assert [len(empty.next()) for _ in range(3)] == [0, 0, 0]
    assert steps_per_epoch(100, 32, LOCAL) == 4


class _FourWorkers(GlobalOps):
    """What one of four workers with equal shards sees: sums are four times its own."""

    world_size = 4

    def all_reduce_sum(self, tensor):
        return tensor * 4


def test_batch_size_is_global_so_step_schedules_do_not_depend_on_the_worker_count():
    # 1,000 rows, global batch 64: 16 steps an epoch on one worker and on each of four (250 rows each), whose
    # local batches of 15-16 rows add up to the global batch.
    assert steps_per_epoch(1000, 64, LOCAL) == steps_per_epoch(250, 64, _FourWorkers()) == 16
    sampler = EpochSampler(250, 16, np.random.default_rng(0))
    sizes = [len(sampler.next()) for _ in range(16)]
    assert sum(sizes) == 250 and set(sizes) <= {15, 16}


def _keyed_batches(keys: np.ndarray, steps: int, epochs: int = 2) -> list[set[int]]:
    s = EpochSampler(len(keys), steps, np.random.default_rng(0), keys=keys, salt=12345)
    out = []
    for _ in range(steps * epochs):
        idx = s.next()
        assert s.weight == 1.0 and s.rows == len(idx)  # one worker: the local batch is the global batch
        out.append(set(keys[idx].tolist()))
    return out


def test_keyed_batches_are_the_same_global_batches_for_any_split_of_the_rows():
    keys = np.random.default_rng(0).integers(0, 2**63, 500).astype(np.uint64)
    whole = _keyed_batches(keys, 8)
    # two "workers" holding the rows in another order: the union of their step-b batches is the 1-worker batch
    rev = keys[::-1]
    halves = [_keyed_batches(rev[0::2], 8), _keyed_batches(rev[1::2], 8)]
    assert [a | b for a, b in zip(*halves)] == whole
    for epoch in (whole[:8], whole[8:]):  # every row once per epoch, batch sizes around 500 / 8
        assert sorted(k for b in epoch for k in b) == sorted(keys.tolist())
        assert all(30 <= len(b) <= 95 for b in epoch)
    assert whole[:8] != whole[8:]  # a new partition each epoch


def test_keyed_sampler_resumes_the_same_batches_and_noise_keys():
    keys = np.arange(100, dtype=np.uint64) * np.uint64(7919)
    a = EpochSampler(100, 4, np.random.default_rng(0), keys=keys, salt=3)
    for _ in range(6):
        a.next()
    state = safestate.loads(safestate.dumps({"s": a.state_dict()}))["s"]
    expect = [(a.next(), a.noise_keys()) for _ in range(5)]
    b = EpochSampler(100, 4, np.random.default_rng(0), keys=keys, salt=3)
    b.load_state_dict(state)
    for idx, noise in expect:
        np.testing.assert_array_equal(idx, b.next())
        np.testing.assert_array_equal(noise, b.noise_keys())


def test_derived_seeds_are_distinct_stable_and_fit_a_c_int():
    seeds = {derive_seed(s, st, r) for s in range(3) for st in Stream for r in (None, 0, 1)}
    assert len(seeds) == 3 * len(Stream) * 3
    assert all(0 <= v < 2**31 for v in seeds)
    assert derive_seed(0, Stream.KMEANS) == derive_seed(0, Stream.KMEANS)
    assert derive_seed(0, Stream.BATCHES, 0, "a") != derive_seed(0, Stream.BATCHES, 0, "b")
    with pytest.raises(ValueError):
        derive_seed(-1, Stream.WEIGHTS)


# ------------------------------------------------------------------------------------ algorithms
K = 3
AE = {"hidden": [16], "latent": 4, "epochs": 4, "batch_size": 16}
LOOP = {"batch_size": 16, "max_iter": 60, "update_interval": 5, "checkpoint_every": 2, "tol": 0.0}
CONFIGS = {
    "dec": {"view": "image", "ae": AE, "init": {"nredo": 2}, "cluster": LOOP, "device": "cpu"},
    "jecl": {"image_ae": AE, "text_ae": AE, "init": {"nredo": 2}, "cluster": LOOP, "device": "cpu"},
    "dm2c": {"image_hidden": [16], "text_hidden": [16], "latent_dim": 8, "mapping_hidden": [16],
             "critic_hidden": [4], "batch_size": 16, "pretrain_epochs": 2, "adv_epochs": 5, "kmeans_nredo": 2,
             "checkpoint_every": 2, "device": "cpu"},
    "mmdc": {"backbone": "convnet", "epochs": 4, "batch_size": 16, "refine_epoch": 3, "lr_milestones": [2],
             "rotation": True, "rotation_copies": 1, "device": "cpu", "eval_crop": None, "crop_sizes": [24],
             "kmeans_nredo": 1, "convnet_widths": [4, 8, 8, 8], "checkpoint_every": 1},
}
PHASES = {"dec": ["pretrained", "initialised", "self_training"], "jecl": ["pretrained", "initialised", "self_training"],
          "dm2c": ["pretrained", "adversarial"], "mmdc": ["epoch"]}
# a float64 fit resumes as exactly (its checkpoints hold float64 weights and optimizer state)
CONFIGS["jecl-float64"], PHASES["jecl-float64"] = {**CONFIGS["jecl"], "precision": "float64"}, PHASES["jecl"]


def algorithm(name: str) -> str:
    return name.split("-")[0]


def two_view(n: int = 64, seed: int = 0) -> MultiViewData:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    image = (rng.normal(size=(K, 12))[y] * 3 + rng.normal(size=(n, 12))).astype(np.float32)
    text = (rng.normal(size=(K, 8))[y] * 3 + rng.normal(size=(n, 8))).astype(np.float32)
    has_text = rng.random(n) > 0.2  # some captions missing
    return MultiViewData(image=image, text=text * has_text[:, None], has_text=has_text)


def dataset(name: str, n: int = 64) -> MultiViewData:
    if name == "mmdc":
        from test_mmdc import shapes  # tiny real 28x28 images of 3 shapes

        x, _ = shapes(-(-n // 3))
        return MultiViewData(pixels=x[:n], extra={"index": np.arange(n)})
    data = two_view(n)
    return mixed_modal(data, seed=0) if name == "dm2c" else data


def flat(tree, prefix=""):
    """(path, leaf) pairs of a state tree; wall-clock fields left out."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k != "seconds":
                yield from flat(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def assert_same_state(a: dict, b: dict) -> None:
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for key, va in fa.items():
        vb = fb[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        elif isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb, err_msg=key)
        elif isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), key
        else:
            assert va == vb, key


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", sorted(PHASES))
def test_a_fit_killed_at_any_checkpoint_resumes_to_the_uninterrupted_result(name):
    data = dataset(algorithm(name))
    saved: list[dict] = []
    full = make_clusterer(algorithm(name), K, CONFIGS[name], seed=3)
    full.checkpoint_fn = saved.append
    full.fit(data)
    phases = [s["phase"] for s in saved]
    assert sorted(set(phases)) == sorted(PHASES[name]), phases
    reference = full.state_dict()
    for i, phase in enumerate(phases):
        calls: list[dict] = []

        def kill_after(record, i=i):
            calls.append(record)
            if len(calls) == i + 1:
                raise Killed(phase)

        killed = make_clusterer(algorithm(name), K, CONFIGS[name], seed=3)
        killed.checkpoint_fn = kill_after
        with pytest.raises(Killed):
            killed.fit(data)
        resumed = make_clusterer(algorithm(name), K, CONFIGS[name], seed=3)
        resumed.resume_state = safestate.loads(safestate.dumps(calls[-1]))  # as the trainer stores it
        later: list[dict] = []
        resumed.checkpoint_fn = later.append
        resumed.fit(data)
        assert {"phase": "resumed", "from": phase, "streams": "restored"} in resumed.history_
        state = resumed.state_dict()
        if name == "mmdc":  # its history (in the state) holds the resume record
            state["history"] = [h for h in state["history"] if h.get("phase") != "resumed"]
        assert_same_state(state, reference)
        np.testing.assert_array_equal(resumed.predict(data), full.predict(data))
        assert [s["phase"] for s in later] == phases[i + 1:]  # and it goes on checkpointing as before


def test_a_resume_record_of_another_algorithm_is_refused():
    data = dataset("dec")
    saved: list[dict] = []
    m = make_clusterer("dec", K, CONFIGS["dec"], seed=0)
    m.checkpoint_fn = saved.append
    m.fit(data)
    other = make_clusterer("jecl", K, CONFIGS["jecl"], seed=0)
    other.resume_state = saved[0]
    with pytest.raises(ValueError, match="a checkpoint of 'dec' cannot resume 'jecl'"):
        other.fit(data)


@pytest.mark.parametrize("name", ["kmeans", "jecl", "dm2c"])
def test_items_without_any_used_view_are_refused_not_put_in_cluster_0(name):
    data = two_view()
    fitted = make_clusterer(name, K, CONFIGS.get(name), seed=0).fit(mixed_modal(data, 0) if name == "dm2c" else data)
    none = MultiViewData(image=data.image, text=data.text, has_image=np.r_[False, np.ones(63, bool)],
                         has_text=np.r_[False, data.has_text[1:]])
    assert not fitted.usable(none)[0] and fitted.usable(none)[1:].all()
    with pytest.raises(ValueError, match="1 of 64 items have no view"):
        fitted.predict(none)


# ------------------------------------------------------------------------------------ two DDP workers
def _uneven_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import gc

    import torch.distributed as dist
    from test_dec_jecl import DistOps
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = np.arange(0, 30) if rank == 0 else np.arange(30, 64)  # 30 and 34 rows
        out = {}
        for name in ("kmeans", "dec", "jecl", "dm2c", "mmdc"):
            data = dataset(name)
            saved: list[dict] = []
            m = make_clusterer(name, K, CONFIGS.get(name), seed=0,
                               wrap=lambda mod: DDP(mod, find_unused_parameters=True))
            m.checkpoint_fn = saved.append
            m.fit(data.subset(shard), DistOps())
            out[f"{name}_pred"] = m.predict(data)
            out[f"{name}_steps"] = m.n_iter_
            if name == "jecl":  # both workers resumed from a mid-training checkpoint end where they would have
                r = make_clusterer(name, K, CONFIGS[name], seed=0, wrap=lambda mod: DDP(mod, find_unused_parameters=True))
                r.resume_state = safestate.loads(safestate.dumps([s for s in saved if s["phase"] == "self_training"][0]))
                r.fit(data.subset(shard), DistOps())
                out["jecl_resumed_equal"] = all(torch.equal(a, b) for a, b in zip(
                    r.state_dict()["net"].values(), m.state_dict()["net"].values()))
            del m
            gc.collect()
        np.savez(f"{out_dir}/rank{rank}.npz", **out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_workers_on_uneven_shards_finish_every_algorithm(tmp_path):
    from conftest import spawn_workers

    r0, r1 = spawn_workers(_uneven_worker, tmp_path)
    for name in ("kmeans", "dec", "jecl", "dm2c", "mmdc"):
        np.testing.assert_array_equal(r0[f"{name}_pred"], r1[f"{name}_pred"], err_msg=name)  # one model
        assert int(r0[f"{name}_steps"]) == int(r1[f"{name}_steps"]) > 0, name
        assert len(np.unique(r0[f"{name}_pred"])) > 1, name
    assert bool(r0["jecl_resumed_equal"]) and bool(r1["jecl_resumed_equal"])
