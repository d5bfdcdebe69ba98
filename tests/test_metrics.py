"""Clustering metrics against values worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymmc.report.metrics import (
    METRICS,
    ari,
    cluster_acc,
    cluster_sizes,
    contingency,
    evaluate,
    format_mean_std,
    nmi,
    pairwise_f_score,
    pairwise_precision_recall_f,
    purity,
    summarize,
)

# Case A: 6 items, 2 classes, 2 clusters.
#   y_true = 0 0 0 1 1 1,  y_pred = 0 0 1 1 1 1
#   contingency (rows = class, cols = cluster): [[2, 1], [0, 3]]
Y_TRUE_A = [0, 0, 0, 1, 1, 1]
Y_PRED_A = [0, 0, 1, 1, 1, 1]


def test_contingency_case_a():
    assert contingency(Y_TRUE_A, Y_PRED_A).tolist() == [[2, 1], [0, 3]]


def test_hand_computed_case_a():
    # ACC: cluster 0 -> class 0 (2 right), cluster 1 -> class 1 (3 right): 5/6.
    assert cluster_acc(Y_TRUE_A, Y_PRED_A) == pytest.approx(5 / 6)
    # Purity: majority of cluster 0 is 2, of cluster 1 is 3: 5/6.
    assert purity(Y_TRUE_A, Y_PRED_A) == pytest.approx(5 / 6)
    # Pairs: TP = C(2,2)+C(1,2)+C(0,2)+C(3,2) = 1+0+0+3 = 4;
    # same-cluster pairs = C(2,2)+C(4,2) = 1+6 = 7; same-class pairs = C(3,2)+C(3,2) = 6.
    # P = 4/7, R = 4/6 = 2/3, F = 2PR/(P+R) = (16/21)/(26/21) = 8/13.
    p, r, f = pairwise_precision_recall_f(Y_TRUE_A, Y_PRED_A)
    assert (p, r) == (pytest.approx(4 / 7), pytest.approx(2 / 3))
    assert f == pytest.approx(8 / 13)
    assert pairwise_f_score(Y_TRUE_A, Y_PRED_A) == pytest.approx(8 / 13)
    # ARI: index = 4, row pairs a = 6, col pairs b = 7, total pairs C(6,2) = 15.
    # expected = a*b/15 = 2.8, max = (a+b)/2 = 6.5, ARI = (4-2.8)/(6.5-2.8) = 1.2/3.7 = 12/37.
    assert ari(Y_TRUE_A, Y_PRED_A) == pytest.approx(12 / 37)
    # NMI: H(true) = ln 2; cluster sizes 2,4 -> H(pred) = -(1/3 ln 1/3 + 2/3 ln 2/3).
    # MI = sum p_ij ln(p_ij / (p_i p_j)):
    #   (0,0): 2/6 ln((2/6)/(1/2*1/3)) = 1/3 ln 2
    #   (0,1): 1/6 ln((1/6)/(1/2*2/3)) = 1/6 ln(1/2)
    #   (1,1): 3/6 ln((3/6)/(1/2*2/3)) = 1/2 ln(3/2)
    #   MI = 1/6 ln 2 + 1/2 ln 1.5 = 0.318258...;  H_pred = 0.636514...;  NMI = MI / ((H_true+H_pred)/2) = 0.478704...
    h_true = math.log(2)
    h_pred = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    mi = math.log(2) / 6 + math.log(1.5) / 2
    expected_nmi = mi / ((h_true + h_pred) / 2)
    assert expected_nmi == pytest.approx(0.478704, abs=1e-6)
    assert nmi(Y_TRUE_A, Y_PRED_A) == pytest.approx(expected_nmi)


def test_evaluate_returns_python_floats_with_fixed_keys():
    out = evaluate(Y_TRUE_A, Y_PRED_A)
    assert tuple(out) == METRICS
    assert all(type(v) is float for v in out.values())
    assert out["acc"] == pytest.approx(5 / 6)
    assert out["f_score"] == pytest.approx(8 / 13)
    assert out["ari"] == pytest.approx(12 / 37)


def test_perfect_clustering_with_other_cluster_ids():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [7, 7, 3, 3, 5, 5, 5]  # same partition, different ids
    out = evaluate(y_true, y_pred)
    assert out == {"acc": 1.0, "nmi": 1.0, "ari": 1.0, "purity": 1.0, "f_score": 1.0}


def test_single_cluster_is_the_worst_case():
    # 3 classes of 2, everything in one cluster.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0] * 6
    out = evaluate(y_true, y_pred)
    assert out["acc"] == pytest.approx(1 / 3)  # one cluster matches one class of 2 items
    assert out["purity"] == pytest.approx(1 / 3)
    assert out["nmi"] == pytest.approx(0.0)  # MI = 0
    assert out["ari"] == pytest.approx(0.0)  # index 3 = expected 3*15/15
    # TP = 3 * C(2,2) = 3, same-cluster pairs = C(6,2) = 15, same-class pairs = 3:
    # P = 1/5, R = 1, F = (2/5)/(6/5) = 1/3.
    assert out["f_score"] == pytest.approx(1 / 3)


def test_more_clusters_than_classes():
    # Every item its own cluster: 2 classes of 2, 4 clusters.
    y_true = [0, 0, 1, 1]
    y_pred = [0, 1, 2, 3]
    # One-to-one: only 2 clusters can be matched (1 item each): 2/4. Purity: every cluster pure.
    assert cluster_acc(y_true, y_pred) == pytest.approx(0.5)
    assert purity(y_true, y_pred) == pytest.approx(1.0)
    # No pair shares a cluster: TP = 0 -> F = 0. ARI: index 0, expected 0, max (2+0)/2 = 1 -> 0.
    assert pairwise_f_score(y_true, y_pred) == 0.0
    assert ari(y_true, y_pred) == pytest.approx(0.0)
    # MI = H(true) - H(true|pred) = ln 2 - 0; NMI = ln2 / ((ln2 + ln4)/2) = 2/3.
    assert nmi(y_true, y_pred) == pytest.approx(2 / 3)


def test_more_clusters_than_classes_split_class():
    # class 0 split over clusters 0 and 1, class 1 = cluster 2: contingency [[2, 2, 0], [0, 0, 2]].
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 1, 1, 2, 2]
    assert cluster_acc(y_true, y_pred) == pytest.approx(4 / 6)  # cluster 1 is left unmatched
    assert purity(y_true, y_pred) == pytest.approx(1.0)
    # TP = 1+1+1 = 3; same-cluster = 3; same-class = C(4,2)+C(2,2) = 7: P = 1, R = 3/7, F = 0.6.
    assert pairwise_f_score(y_true, y_pred) == pytest.approx(0.6)


def test_fewer_clusters_than_classes():
    # contingency [[2, 0], [0, 2], [0, 1]]: 3 classes, 2 clusters.
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 1]
    assert cluster_acc(y_true, y_pred) == pytest.approx(4 / 5)
    assert purity(y_true, y_pred) == pytest.approx(4 / 5)


def test_all_singletons_on_both_sides_is_perfect():
    assert pairwise_f_score(["a", "b", "c"], [0, 1, 2]) == 1.0


def test_string_labels():
    y_true = ["cat", "cat", "dog", "dog", "dog", "owl"]
    y_pred = [1, 1, 0, 0, 2, 2]
    # contingency (cat, dog, owl) x (0, 1, 2): [[0, 2, 0], [2, 0, 1], [0, 0, 1]]
    assert contingency(y_true, y_pred).tolist() == [[0, 2, 0], [2, 0, 1], [0, 0, 1]]
    # best: 1->cat (2), 0->dog (2), 2->owl (1) = 5/6; purity: 2 + 2 + 1 = 5/6 (cluster 2 tie).
    assert cluster_acc(y_true, y_pred) == pytest.approx(5 / 6)
    assert purity(y_true, y_pred) == pytest.approx(5 / 6)
    same_as_ints = evaluate([0, 0, 1, 1, 1, 2], y_pred)
    assert evaluate(y_true, y_pred) == pytest.approx(same_as_ints)
    # object arrays, as the pipeline passes them (labels read from Arrow)
    assert evaluate(np.array(y_true, dtype=object), np.array(y_pred)) == pytest.approx(same_as_ints)


def test_invariant_to_permuting_labels_and_cluster_ids():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 7, size=300))
    base = evaluate(y_true, y_pred)
    cls_perm = rng.permutation(5)
    clu_perm = rng.permutation(7) + 100
    names = np.array(["a", "b", "c", "d", "e"])
    moved = evaluate(names[cls_perm[y_true]], clu_perm[y_pred])
    assert moved == pytest.approx(base)
    # and the item order does not matter either
    order = rng.permutation(300)
    assert evaluate(y_true[order], y_pred[order]) == pytest.approx(base)


@pytest.mark.parametrize("seed", range(5))
def test_cluster_acc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=40)
    y_pred = rng.integers(0, 4, size=40)
    best = max(
        np.mean(np.array(perm)[y_pred] == y_true) for perm in itertools.permutations(range(4))
    )
    assert cluster_acc(y_true, y_pred) == pytest.approx(best)


def test_pairwise_f_matches_quadratic_definition():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, size=60)
    y_pred = rng.integers(0, 4, size=60)
    i, j = np.triu_indices(60, k=1)
    same_class = y_true[i] == y_true[j]
    same_cluster = y_pred[i] == y_pred[j]
    tp = np.sum(same_class & same_cluster)
    p, r = tp / same_cluster.sum(), tp / same_class.sum()
    assert pairwise_f_score(y_true, y_pred) == pytest.approx(2 * p * r / (p + r))


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 items"):
        evaluate([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [])
    with pytest.raises(ValueError, match="None"):
        evaluate(["a", None], [0, 1])


def test_cluster_sizes():
    assert cluster_sizes(np.array([2, 0, 2, 2, 5])) == {0: 1, 2: 3, 5: 1}
    sizes = cluster_sizes([1, 1])
    assert all(type(k) is int and type(v) is int for k, v in sizes.items())


def test_summarize_uses_population_std():
    # mean 0.5; deviations -0.1, 0, 0.1 -> population var = 0.02/3, sample var = 0.02/2.
    mean, std = summarize([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(0.02 / 3))
    assert summarize([0.4, 0.5, 0.6], ddof=1)[1] == pytest.approx(0.1)
    assert summarize([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        summarize([])


def test_format_mean_std():
    # mean 0.541, population std of (0.517, 0.565) = 0.024
    assert format_mean_std([0.517, 0.565]) == "0.541 ± 0.024"
    assert format_mean_std([0.5], digits=2) == "0.50 ± 0.00"


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 8), st.integers(1, 60))
@settings(max_examples=60, deadline=None)
def test_metrics_from_the_contingency_table_equal_sklearn_on_the_items(seed, n_classes, n_clusters, n):
    """What a distributed run computes from aggregated counts is what scikit-learn computes from the items."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from raymmc.report.metrics import evaluate_contingency

    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, n_classes, n), rng.integers(0, n_clusters, n)
    got = evaluate_contingency(contingency(y, p))
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, p), abs=1e-9)
    assert got["ari"] == pytest.approx(adjusted_rand_score(y, p), abs=1e-9)
    padded = np.zeros((n_classes + 2, n_clusters + 3), np.int64)  # classes/clusters with no items change nothing
    padded[:n_classes, :n_clusters] = np.bincount(y * n_clusters + p, minlength=n_classes * n_clusters).reshape(
        n_classes, n_clusters)
    assert evaluate_contingency(padded) == pytest.approx(got, abs=1e-12)
