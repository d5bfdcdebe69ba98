"""The clustering math shared by DEC and JECL (and usable by DM2C/MMDC): soft assignments,
DEC targets, JECL's joint target, KL / JSD divergences and the balance regulariser.

Everything is PyTorch and differentiable where a gradient is meant to flow (soft assignments,
divergences w.r.t. their second argument, the regulariser).  Targets are computed under
``torch.no_grad`` by the callers.  The whole-data-set quantity of a target -- the soft cluster
frequency ``f_j = sum_i q_ij`` -- is computed with :func:`global_soft_frequency`, which sums the
per-worker column sums through ``ops.all_reduce_sum`` so that it is globally right under
data-parallel training (one K-vector all-reduce per target update).

Natural logarithms throughout (JSD is bounded by ``log 2``).
"""

from __future__ import annotations

import math

import torch

from raymmc.cluster.base import LOCAL, GlobalOps

EPS = 1e-12


def student_t_soft_assign(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC soft assignment ``q_ij ∝ (1 + |z_i - mu_j|^2 / alpha)^(-(alpha+1)/2)``, rows sum to 1.

    z: (n, d) embeddings; mu: (K, d) centroids.  Returns (n, K).
    """
    sq = torch.cdist(z, mu, p=2.0, compute_mode="donot_use_mm_for_euclid_dist").pow(2) if z.shape[0] else \
        z.new_zeros((0, mu.shape[0]))
    logits = -(alpha + 1.0) / 2.0 * torch.log1p(sq / alpha)
    return torch.softmax(logits, dim=1)  # same as normalising the kernel, but stable far from all centroids


def soft_frequency(q: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Local column sums ``sum_i w_i q_ij`` (K,) -- the per-worker part of ``f``."""
    if weight is None:
        return q.sum(dim=0)
    return (q * weight.to(q.dtype)[:, None]).sum(dim=0)


def global_soft_frequency(q: torch.Tensor, ops: GlobalOps = LOCAL, weight: torch.Tensor | None = None,
                          normalize: bool = False) -> torch.Tensor:
    """``f_j = sum_i q_ij`` over the WHOLE data set (all workers): local column sums, all-reduced.

    ``weight`` (n,) 0/1 masks items out (e.g. items without a caption for the text view).
    ``normalize=True`` divides by the global number (weight) of items: the soft frequency as a
    fraction, which makes targets mixed across views independent of how many items each view has.
    """
    local = soft_frequency(q.detach().double(), None if weight is None else weight.double())
    count = q.new_tensor([q.shape[0] if weight is None else float(weight.sum())], dtype=torch.float64)
    summed = ops.all_reduce_sum(torch.cat([local, count]))
    f, total = summed[:-1], summed[-1]
    if normalize:
        f = f / torch.clamp(total, min=1.0)
    return f.to(q.dtype)


def target_distribution(q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """DEC target ``p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')``; rows sum to 1.

    ``f`` (K,) is the soft cluster frequency over the whole data set (any positive scale).
    """
    w = q.pow(2) / torch.clamp(f, min=EPS)[None, :]
    return w / torch.clamp(w.sum(dim=1, keepdim=True), min=EPS)


def joint_target(q: torch.Tensor, r: torch.Tensor, f: torch.Tensor, g: torch.Tensor, lam: float = 0.5,
                 has_text: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
                 mix: str = "joint") -> torch.Tensor:
    """JECL joint target from the image term ``a_ij = q_ij^2/f_j`` and the text term ``b_ij = r_ij^2/g_j``.

    ``mix="joint"``: ``p ∝ lam a + (1-lam) b`` normalised over j, so an item whose views agree
    confidently gets a sharper target; a row with ``has_text`` False uses its image term alone
    (renormalised: a full DEC target), one with ``has_image`` False its text term alone.
    ``mix="per_view"`` (the paper's reading, ../shared/ALGORITHMS.md): each term normalised over j,
    then mixed, ``p = lam a/|a| + (1-lam) b/|b|``; a missing view's term is 0, so a caption-less row
    sums to ``lam`` and pulls with less weight than a paired one.  Pass ``f`` and ``g`` on the same
    scale (e.g. both as fractions, see :func:`global_soft_frequency`), else ``lam`` is silently
    re-weighted under "joint".
    """
    a = q.pow(2) / torch.clamp(f, min=EPS)[None, :]
    b = r.pow(2) / torch.clamp(g, min=EPS)[None, :]
    if mix == "per_view":
        a = a / torch.clamp(a.sum(dim=1, keepdim=True), min=EPS)
        b = b / torch.clamp(b.sum(dim=1, keepdim=True), min=EPS)
    elif mix != "joint":
        raise ValueError(f"unknown joint-target mix {mix!r} (joint or per_view)")
    w = lam * a + (1.0 - lam) * b
    # A row without one view: "per_view" drops that view's term (the row sums to lam or 1-lam);
    # "joint" keeps the other view's term alone, renormalised below (whatever lam, 0 and 1 included).
    only_a, only_b = (lam * a, (1.0 - lam) * b) if mix == "per_view" else (a, b)
    if has_text is not None:
        w = torch.where(has_text.bool()[:, None], w, only_a)
    if has_image is not None:
        w = torch.where(has_image.bool()[:, None], w, only_b)
    if mix == "per_view":
        return w
    return w / torch.clamp(w.sum(dim=1, keepdim=True), min=EPS)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_j p_ij log(p_ij / q_ij)`` (n,), with ``0 log 0 = 0``."""
    logp = torch.log(torch.clamp(p, min=EPS))
    logq = torch.log(torch.clamp(q, min=EPS))
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=1)


def kl_div(p: torch.Tensor, q: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of ``KL(P_i || Q_i)``; with ``weight`` (n,) the weighted sum divided by n
    (masked rows contribute nothing, the denominator stays the batch size)."""
    rows = kl_rows(p, q)
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    return rows.sum() / max(p.shape[0], 1)


def jsd(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence ``(KL(Q||M) + KL(R||M)) / 2``, ``M = (Q+R)/2``; in [0, log 2]."""
    m = 0.5 * (q + r)
    return 0.5 * (kl_rows(q, m) + kl_rows(r, m))


def uniform_kl(qbar: torch.Tensor) -> torch.Tensor:
    """``KL(qbar || U) = sum_j qbar_j log(K qbar_j)``: zero at the uniform distribution, ``log K`` at most."""
    k = qbar.shape[-1]
    qbar = qbar / torch.clamp(qbar.sum(dim=-1, keepdim=True), min=EPS)
    return torch.where(qbar > 0, qbar * (torch.log(torch.clamp(qbar, min=EPS)) + math.log(k)),
                       torch.zeros_like(qbar)).sum(dim=-1)


def mean_assignment(q: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``qbar_j`` = mean of the rows of ``q`` (optionally only rows with weight 1), with gradient."""
    if weight is None:
        return q.mean(dim=0)
    w = weight.to(q.dtype)
    return (q * w[:, None]).sum(dim=0) / torch.clamp(w.sum(), min=1.0)


def label_change_fraction(new: torch.Tensor, old: torch.Tensor | None, ops: GlobalOps = LOCAL,
                          weight: torch.Tensor | None = None) -> float:
    """Fraction of items (globally, counts all-reduced) whose hard label changed; 1.0 the first time."""
    if old is None:
        return 1.0
    changed = (new != old)
    if weight is not None:
        changed = changed & weight.bool()
        total = weight.bool().sum()
    else:
        total = torch.tensor(new.numel())
    counts = ops.all_reduce_sum(torch.stack([changed.sum().double(), total.double()]))
    return float(counts[0] / torch.clamp(counts[1], min=1.0))
