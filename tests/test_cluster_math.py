"""The shared clustering math against hand-computed values, and its data-parallel reductions."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from raymmc.cluster.assignment import (align_clusters, align_from_cooccurrence, cooccurrence, inverse_permutation,
                                       linear_assignment, match_labels, match_mapping)
from raymmc.cluster.base import GlobalOps, MultiViewData
from raymmc.cluster.losses import (global_soft_frequency, joint_target, jsd, kl_div, kl_rows, label_change_fraction,
                                   mean_assignment, student_t_soft_assign, target_distribution, uniform_kl)
from raymmc.cluster.protocols import drop_captions, mixed_modal


class ThreadGroup:
    """A fake process group: ``world`` threads exchange tensors through a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadOps(GlobalOps):
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world

    def all_reduce_sum(self, tensor):
        return torch.stack(self.group.exchange(self.rank, tensor)).sum(0)

    def all_gather_cat(self, tensor):
        return torch.cat(self.group.exchange(self.rank, tensor), dim=0)

    def broadcast(self, tensor, src=0):
        return self.group.exchange(self.rank, tensor)[src].clone()

    def barrier(self):
        self.group.barrier.wait()


def run_workers(world: int, fn):
    """Run ``fn(ops)`` on ``world`` threads; returns the results by rank."""
    group = ThreadGroup(world)
    results: list = [None] * world
    errors: list = []

    def target(rank):
        try:
            results[rank] = fn(ThreadOps(group, rank))
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------------
# soft assignment and targets


def test_student_t_matches_hand_computed():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    q = student_t_soft_assign(z, mu)
    # item 0: d^2 = 0, 1 -> kernels 1, 1/2 -> q = 2/3, 1/3; item 1: d^2 = 2, 1 -> 1/3, 1/2 -> 2/5, 3/5
    assert torch.allclose(q, torch.tensor([[2 / 3, 1 / 3], [0.4, 0.6]]), atol=1e-6)
    # alpha = 3: (1 + d^2/3)^-2
    q3 = student_t_soft_assign(z, mu, alpha=3.0)
    k0 = torch.tensor([1.0, (1 + 1 / 3) ** -2])
    assert torch.allclose(q3[0], k0 / k0.sum(), atol=1e-6)


def test_student_t_stable_far_away_and_differentiable():
    z = torch.tensor([[1e4, 1e4]], requires_grad=True)
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    q = student_t_soft_assign(z, mu)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(1))
    q[0, 0].backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()


def test_target_distribution_hand_computed():
    q = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    f = q.sum(0)  # [1.4, 0.6]
    p = target_distribution(q, f)
    w0 = torch.tensor([0.25 / 1.4, 0.25 / 0.6], dtype=torch.float64)
    w1 = torch.tensor([0.81 / 1.4, 0.01 / 0.6], dtype=torch.float64)
    assert torch.allclose(p[0], w0 / w0.sum())
    assert torch.allclose(p[1], w1 / w1.sum())
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
    # invariant to the scale of f (sums or fractions)
    assert torch.allclose(target_distribution(q, f / 2), p)


def test_target_rows_sum_to_one_random():
    q = torch.softmax(torch.randn(50, 7), 1)
    p = target_distribution(q, q.sum(0))
    assert torch.allclose(p.sum(1), torch.ones(50), atol=1e-6)
    # sharpening: the target is more confident than q on the argmax
    assert (p.max(1).values >= q.max(1).values - 1e-6).float().mean() > 0.9


def test_joint_target_hand_computed_and_missing_caption():
    q = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    r = torch.tensor([[0.2, 0.8], [0.2, 0.8]], dtype=torch.float64)
    f = torch.tensor([0.5, 0.5], dtype=torch.float64)
    g = torch.tensor([0.4, 0.6], dtype=torch.float64)
    has_text = torch.tensor([True, False])
    p = joint_target(q, r, f, g, lam=0.5, has_text=has_text)
    w = 0.5 * torch.tensor([0.36 / 0.5, 0.16 / 0.5]) + 0.5 * torch.tensor([0.04 / 0.4, 0.64 / 0.6])
    assert torch.allclose(p[0].float(), w / w.sum(), atol=1e-6)
    # no caption: the image term alone == DEC's target for that row
    assert torch.allclose(p[1], target_distribution(q[1:], f)[0])
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
    # no image: the text term alone
    p2 = joint_target(q, r, f, g, lam=0.5, has_image=torch.tensor([False, True]))
    assert torch.allclose(p2[0], target_distribution(r[:1], g)[0])
    # lam = 1 ignores the text
    assert torch.allclose(joint_target(q, r, f, g, lam=1.0), target_distribution(q, f))


# ------------------------------------------------------------------------------------------
# divergences


def test_kl_div_hand_computed():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = math.log(2.0)  # 0 log 0 = 0
    assert torch.allclose(kl_rows(p, q), torch.tensor([row0, row1], dtype=torch.float64))
    assert math.isclose(float(kl_div(p, q)), (row0 + row1) / 2, rel_tol=1e-9)
    # masked: the weighted sum over the batch size
    assert math.isclose(float(kl_div(p, q, torch.tensor([1.0, 0.0]))), row0 / 2, rel_tol=1e-9)
    assert float(kl_div(q, q)) == pytest.approx(0.0, abs=1e-12)


def test_kl_div_gradient_matches_dec():
    # d KL(P||Q) / d log-kernel: DEC's gradient direction; a sanity check that grads flow into q
    q_logits = torch.randn(4, 3, requires_grad=True)
    q = torch.softmax(q_logits, 1)
    p = target_distribution(q.detach(), q.detach().sum(0))
    kl_div(p, q).backward()
    assert torch.allclose(q_logits.grad, (q - p).detach() / 4, atol=1e-6)


def test_jsd_properties():
    q = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    r = torch.tensor([[0.2, 0.8], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    j = jsd(q, r)
    assert torch.allclose(j, jsd(r, q))  # symmetric
    assert float(j[2]) == pytest.approx(0.0, abs=1e-12)  # zero for equal rows
    assert float(j[1]) == pytest.approx(math.log(2.0), rel=1e-9)  # disjoint supports: the bound log 2
    m = 0.5 * (q[0] + r[0])
    hand = 0.5 * float((q[0] * (q[0] / m).log()).sum() + (r[0] * (r[0] / m).log()).sum())
    assert float(j[0]) == pytest.approx(hand, rel=1e-9)
    rnd_q = torch.softmax(torch.randn(200, 5) * 5, 1)
    rnd_r = torch.softmax(torch.randn(200, 5) * 5, 1)
    jr = jsd(rnd_q, rnd_r)
    assert (jr >= -1e-7).all() and (jr <= math.log(2.0) + 1e-6).all()


def test_uniform_kl():
    assert float(uniform_kl(torch.full((4,), 0.25))) == pytest.approx(0.0, abs=1e-7)
    assert float(uniform_kl(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == pytest.approx(math.log(4.0), rel=1e-6)
    qbar = torch.tensor([0.5, 0.25, 0.25])
    hand = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)
    assert float(uniform_kl(qbar)) == pytest.approx(hand, rel=1e-6)
    # gradient flows back to the assignments through the batch mean
    logits = torch.randn(8, 3, requires_grad=True)
    uniform_kl(mean_assignment(torch.softmax(logits, 1))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_mean_assignment_masked():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(mean_assignment(q, torch.tensor([1.0, 1.0, 0.0])), torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------------------------------------
# assignment


def test_linear_assignment_and_alignment():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cost[rows, cols].sum() == 5.0
    rows, cols = linear_assignment(cost, maximize=True)
    assert cost[rows, cols].sum() == 11.0

    rng = np.random.default_rng(0)
    k = 6
    a = rng.integers(0, k, 600)
    true_perm = rng.permutation(k)  # text cluster true_perm[i] is image cluster i
    b = true_perm[a]
    noisy = b.copy()
    flip = rng.random(600) < 0.2
    noisy[flip] = rng.integers(0, k, flip.sum())
    perm = align_clusters(a, noisy, k)
    assert perm.tolist() == true_perm.tolist()
    assert (inverse_permutation(perm)[b] == a).all()
    c = cooccurrence(a, b, k)
    assert c.sum() == 600 and (np.diag(c[:, perm]) == np.bincount(a, minlength=k)).all()
    assert align_from_cooccurrence(c).tolist() == true_perm.tolist()


def test_match_labels():
    old = np.array([0, 0, 1, 1, 2, 2, 2])
    new = np.array([2, 2, 0, 0, 1, 1, 0])
    assert match_labels(new, old, 3).tolist() == [0, 0, 1, 1, 2, 2, 1]
    assert match_mapping(new, old, 3).tolist() == [1, 2, 0]


# ------------------------------------------------------------------------------------------
# data-parallel reductions


def test_global_frequency_two_workers_equals_single_process():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(101, 5) * 3, 1).double()
    w = (torch.rand(101) > 0.3).double()
    f_single = global_soft_frequency(q)
    f_single_w = global_soft_frequency(q, weight=w, normalize=True)
    p_single = target_distribution(q, f_single)
    shards = [slice(0, 37), slice(37, 101)]

    def work(ops):
        s = shards[ops.rank]
        f = global_soft_frequency(q[s], ops)
        fw = global_soft_frequency(q[s], ops, weight=w[s], normalize=True)
        return f, fw, target_distribution(q[s], f)

    res = run_workers(2, work)
    for f, fw, _ in res:
        assert torch.allclose(f, f_single) and torch.allclose(fw, f_single_w)
    assert torch.allclose(torch.cat([res[0][2], res[1][2]]), p_single)


def test_label_change_fraction_global():
    new = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    old = torch.tensor([0, 1, 2, 1, 1, 2, 2, 1])
    assert label_change_fraction(new, None) == 1.0
    assert label_change_fraction(new, old) == pytest.approx(2 / 8)
    res = run_workers(2, lambda ops: label_change_fraction(new[ops.rank * 4:(ops.rank + 1) * 4],
                                                           old[ops.rank * 4:(ops.rank + 1) * 4], ops))
    assert res == [pytest.approx(2 / 8)] * 2


# ------------------------------------------------------------------------------------------
# protocols


def test_protocols():
    rng = np.random.default_rng(0)
    data = MultiViewData(image=rng.normal(size=(40, 3)).astype(np.float32),
                         text=rng.normal(size=(40, 2)).astype(np.float32))
    half = drop_captions(data, 0.5, seed=1)
    assert half.has_text.sum() == 20 and (half.text[~half.has_text] == 0).all()
    assert (drop_captions(data, 0.5, seed=1).has_text == half.has_text).all()
    assert drop_captions(data, 0.0).has_text.all() and not drop_captions(data, 1.0).has_text.any()
    mixed = mixed_modal(data, seed=0)
    assert (mixed.has_image ^ mixed.has_text).all()
    assert 10 < mixed.has_image.sum() < 30


def test_joint_target_per_view_is_the_papers_reading():
    """mix="per_view": each view's DEC target, mixed by lam; a caption-less row sums to lam (the paper:
    the missing text term is 0, so captioned items get the larger p and gradient)."""
    g_ = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, 4, generator=g_, dtype=torch.float64), 1)
    r = torch.softmax(torch.randn(6, 4, generator=g_, dtype=torch.float64), 1)
    f, g = q.mean(0), r.mean(0)
    has_text = torch.tensor([True, True, False, True, False, True])
    has_image = torch.tensor([True, True, True, False, True, True])
    p = joint_target(q, r, f, g, lam=0.3, has_text=has_text, has_image=has_image, mix="per_view")
    pa, pb = target_distribution(q, f), target_distribution(r, g)
    both = has_text & has_image
    assert torch.allclose(p[both], 0.3 * pa[both] + 0.7 * pb[both])
    assert torch.allclose(p[~has_text], 0.3 * pa[~has_text])
    assert torch.allclose(p[~has_image], 0.7 * pb[~has_image])
    assert torch.allclose(p.sum(1), torch.tensor([1, 1, .3, .7, .3, 1], dtype=torch.float64))
    # complete data, lam = 1: DEC's target either way
    assert torch.allclose(joint_target(q, r, f, g, lam=1.0, mix="per_view"), pa)
    with pytest.raises(ValueError, match="mix"):
        joint_target(q, r, f, g, mix="sum")


def test_jecl_text_terms_normalised_by_captioned_count():
    """text_loss_norm="captioned": the text KL and JSD are the mean over captioned rows, so at 50% missing
    captions they keep the weight they have on complete data; "batch" halves them."""
    from raymmc.cluster.jecl import jecl_loss
    g_ = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(8, 3, generator=g_, dtype=torch.float64), 1)
    r = torch.softmax(torch.randn(8, 3, generator=g_, dtype=torch.float64), 1)
    p = target_distribution(q, q.mean(0))
    hi = torch.ones(8, dtype=torch.bool)
    ht = torch.tensor([True, False] * 4)
    batch = jecl_loss(p, q, r, hi, ht, beta=0.1, gamma=0.1)
    capt = jecl_loss(p, q, r, hi, ht, beta=0.1, gamma=0.1, text_loss_norm="captioned")
    assert torch.allclose(capt["kl_text"], 2 * batch["kl_text"])
    assert torch.allclose(capt["jsd"], 2 * batch["jsd"])
    assert torch.allclose(capt["kl_image"], batch["kl_image"])
    # the captioned rows alone, complete: the same per-row mean
    only = jecl_loss(p[ht], q[ht], r[ht], hi[ht], ht[ht], beta=0.1, gamma=0.1)
    assert torch.allclose(capt["kl_text"], only["kl_text"])
    # complete data: both norms agree
    full = torch.ones(8, dtype=torch.bool)
    assert torch.allclose(jecl_loss(p, q, r, hi, full, .1, .1)["loss"],
                          jecl_loss(p, q, r, hi, full, .1, .1, text_loss_norm="captioned")["loss"])


def test_joint_target_missing_view_is_the_other_views_full_target_whatever_lam():
    q = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    r = torch.tensor([[0.2, 0.8]], dtype=torch.float64)
    f = g = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for lam in (0.0, 0.3, 1.0):
        p = joint_target(q, r, f, g, lam=lam, has_text=torch.tensor([False]))
        assert torch.allclose(p, target_distribution(q, f))
        p = joint_target(q, r, f, g, lam=lam, has_image=torch.tensor([False]))
        assert torch.allclose(p, target_distribution(r, g))
