"""TorchDistributedOps on a real 2-process gloo group: the collectives the math relies on, gradients included, and
DEC and JECL under DDP on two workers fitting exactly what one process fits."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymmc.cluster.jecl import global_mean_assignment
from raymmc.cluster.losses import uniform_kl
from raymmc.train.ops import TorchDistributedOps


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ops = TorchDistributedOps()
        local = torch.arange(rank + 2, dtype=torch.float32).reshape(-1, 1) + 10 * rank  # 2 rows, then 3 rows
        summed = ops.all_reduce_sum(torch.tensor([1.0, rank]))
        gathered = ops.all_gather_cat(local)
        bcast = ops.broadcast(torch.tensor([rank + 5.0]), src=1)
        ops.barrier()
        # JECL's regulariser on the global batch (2 rows here, 4 there): with DDP's averaging of the shared
        # weight's gradient, the gradient of one process on all 6 rows.
        x, w = _reg_inputs()
        rows = slice(0, 2) if rank == 0 else slice(2, 6)
        qbar, count = global_mean_assignment(torch.softmax(x[rows] @ w, 1), torch.ones(rows.stop - rows.start), ops)
        uniform_kl(qbar).backward()
        grad = ops.all_reduce_sum(w.grad) / world
        results[rank] = (summed.tolist(), gathered.flatten().tolist(), bcast.tolist(), local.flatten().tolist(),
                         grad.tolist(), count)
    finally:
        dist.destroy_process_group()


def _reg_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g), torch.randn(3, 3, generator=g).requires_grad_()


def test_collectives(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        results = dict(results)
    for rank in range(2):
        summed, gathered, bcast, local, grad, count = results[rank]
        assert summed == [2.0, 1.0]
        assert gathered == [0.0, 1.0, 10.0, 11.0, 12.0]  # rank order, uneven sizes
        assert bcast == [6.0]
        assert local == ([0.0, 1.0] if rank == 0 else [10.0, 11.0, 12.0])  # inputs untouched
        x, w = _reg_inputs()
        uniform_kl(torch.softmax(x @ w, 1).mean(0)).backward()
        assert count == 6 and torch.allclose(torch.tensor(grad), w.grad, atol=1e-6)


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        TorchDistributedOps()


def test_auto_mode_keeps_large_archives_off_the_driver():
    from raymmc.train.trainer import TrainConfig, use_ray_train

    auto = TrainConfig(local_max_items=1000)
    assert not use_ray_train(auto, "kmeans", 1000)  # small: k-means in the driver, no Ray Train start-up
    assert use_ray_train(auto, "kmeans", 1001)  # larger: a Ray Train worker reads the rows, the driver never does
    assert use_ray_train(TrainConfig(workers=2, local_max_items=1000), "kmeans", 10)
    assert use_ray_train(auto, "jecl", 10)  # the deep algorithms always
    assert not use_ray_train(TrainConfig(mode="local", local_max_items=1000), "kmeans", 10**9)  # asked for
    with pytest.raises(ValueError, match="auto, ray or local"):
        use_ray_train(TrainConfig(mode="fast"), "kmeans", 10)


# ------------------------------------------------------------------ 1 vs 2 DDP workers: the same fit
_FIT = {"cluster": {"max_iter": 150, "update_interval": 15}, "device": "cpu"}


def _multiview(n: int = 480, k: int = 5):
    import numpy as np

    from raymmc.cluster.base import MultiViewData

    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    image = (rng.normal(size=(k, 48))[y] + 1.5 * rng.normal(size=(n, 48))).astype(np.float32)
    text = (rng.normal(size=(k, 24))[y] + 1.5 * rng.normal(size=(n, 24))).astype(np.float32)
    has_text = rng.random(n) > 0.3  # a third without caption: JECL's masks and DEC's view subset matter
    text[~has_text] = 0
    return MultiViewData(image=image, text=text, has_text=has_text,
                         ids=np.array([f"item-{i}" for i in range(n)], dtype=object))


def _fit(algorithm: str, data, ops=None, wrap=None):
    from raymmc.cluster.base import LOCAL
    from raymmc.cluster.registry import make_clusterer

    ae = {"epochs": 8, "batch_size": 64}
    config = {**_FIT, **({"image_ae": ae, "text_ae": ae} if algorithm == "jecl" else {"ae": ae, "view": "text"})}
    return make_clusterer(algorithm, 5, config, seed=3, wrap=wrap).fit(data, ops or LOCAL)


def _ddp_worker(rank: int, world: int, init_file: str, algorithm: str, results: dict) -> None:
    import numpy as np
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = _multiview()
        shard = np.arange(len(data))[::-1][rank::world]  # another order and an interleaved split
        model = _fit(algorithm, data.subset(shard), TorchDistributedOps(), DistributedDataParallel)
        results[rank] = (model.predict(_usable(model, data)).tolist(), model.n_iter_)
    finally:
        dist.destroy_process_group()


def _usable(model, data):
    import numpy as np

    return data.subset(np.flatnonzero(model.usable(data)))


@pytest.mark.parametrize("algorithm", ["jecl", "dec"])
def test_two_ddp_workers_fit_what_one_process_fits(tmp_path, algorithm, one_torch_thread):
    """Keyed batches, batch weights and keyed masking noise (raymmc.cluster.sampler) and the keyed k-means
    sample make the union of the workers' batches the one process's batch: only the summation order differs,
    so the assignments agree item by item (not only up to a permutation)."""
    data = _multiview()
    one = _fit(algorithm, data)
    expected = one.predict(_usable(one, data)).tolist()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), algorithm, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        assert all(p.exitcode == 0 for p in procs)
        results = dict(results)
    assert results[0] == results[1]
    labels, n_iter = results[0]
    assert n_iter == one.n_iter_
    assert labels == expected
