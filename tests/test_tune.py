"""`raymmc tune`'s parts without Ray: the search space, the label-free scores, the score sample, the choice."""

from __future__ import annotations

import numpy as np
import pytest

from raymmc.cluster.base import MultiViewData
from raymmc.cluster.registry import make_clusterer, make_config
from raymmc.cluster.selection import agreed_silhouette, agreement, input_space, label_free_scores, silhouette
from raymmc.config import ConfigError, load_config
from raymmc.report.sweep import spearman
from raymmc.sweep import choose_best, with_point
from raymmc.train import tune_space
from raymmc.train.tune import Scorer, TrialSetup, fit_point, point_of, resolve_score, score_mask


def blobs(n_per: int = 40, k: int = 4, seed: int = 0,
          dims: tuple[int, int] = (12, 8)) -> tuple[MultiViewData, np.ndarray]:
    """Two views of ``k`` well-separated clusters (the text view a noisier copy of the same structure)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    img_c, txt_c = rng.normal(size=(k, dims[0])) * 4, rng.normal(size=(k, dims[1])) * 4
    image = (img_c[y] + rng.normal(size=(len(y), dims[0]))).astype(np.float32)
    text = (txt_c[y] + 1.5 * rng.normal(size=(len(y), dims[1]))).astype(np.float32)
    n = len(y)
    data = MultiViewData(image=image, text=text, has_image=np.ones(n, bool), has_text=np.ones(n, bool),
                         ids=np.array([f"i{j}" for j in range(n)], dtype=object), extra={"index": np.arange(n)})
    return data, y


def test_space_overrides_and_errors():
    s = tune_space.space("jecl", {"lam": ["uniform", 0.3, 0.7], "beta": None, "cluster.batch_size": ["choice", [64]]})
    assert s["lam"][0] == ["uniform", 0.3, 0.7] and s["lam"][1] == ("lam",)
    assert "beta" not in s and s["cluster.batch_size"][1] == ("cluster.batch_size",)
    for bad in (["uniform", 0.9, 0.1], ["loguniform", 0, 1], ["choice", []], ["normal", 0, 1], "0.5"):
        with pytest.raises(ConfigError):
            tune_space.space("jecl", {"lam": bad})
    with pytest.raises(ConfigError, match="no search space"):
        tune_space.space("spectral", None)
    assert tune_space.parse_clusters("6:16") == (6, 16) and tune_space.parse_clusters(11) == (11, 11)
    for bad in ("16:6", "1", "a:b", "3:"):
        with pytest.raises(ConfigError):
            tune_space.parse_clusters(bad)
    with pytest.raises(ConfigError, match="tune.space"):
        load_config(None, ["tune.space.jecl.lam=[\"uniform\", 2, 1]"])


@pytest.mark.parametrize("algorithm", sorted(tune_space.SPACES))
def test_every_point_of_every_space_is_a_valid_config(algorithm):
    """Each searched name sets real keys of the algorithm's typed config (a misspelt key would fail here, not in
    the middle of a sweep), tied names set all their keys, and draws stay inside their ranges."""
    specs = tune_space.space(algorithm, None)
    rng = np.random.default_rng(0)
    for _ in range(5):
        point = tune_space.draw(specs, rng)
        params = tune_space.to_params(algorithm, point, {}, specs)
        cfg = make_config(algorithm, params)
        for name, (spec, keys) in specs.items():
            for key in keys:
                value = cfg
                for part in key.split("."):
                    value = getattr(value, part)
                assert value == point[name]
            if spec[0] in ("uniform", "loguniform"):
                assert spec[1] <= point[name] <= spec[2]
            elif spec[0] == "choice":
                assert point[name] in spec[1]


def test_optuna_suggests_inside_the_space():
    optuna = pytest.importorskip("optuna")
    specs = tune_space.space("jecl", None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    point = tune_space.suggest(trial, specs)
    assert set(point) == set(specs) and 0.1 <= point["lam"] <= 0.9 and point["latent"] in (10, 16, 32, 64)


def test_scores_prefer_the_true_clusters():
    data, y = blobs()
    x = input_space(data)
    shuffled = np.random.default_rng(0).permutation(y)
    assert silhouette(x, y) > 0.3 > silhouette(x, shuffled)
    assert np.isnan(silhouette(x, np.zeros(len(y), int)))  # one cluster: undefined
    assert agreement(y, y) == pytest.approx(1.0) and agreement(y, shuffled) < 0.2
    # K: the true 4 beats 2 and 8 on silhouette (k-means fits in the fixed space)
    sil = {k: label_free_scores(make_clusterer("kmeans", k, {}, seed=0).fit(data), data,
                                make_clusterer("kmeans", k, {}, seed=0).fit(data).labels_)["silhouette"]
           for k in (2, 4, 8)}
    assert max(sil, key=sil.get) == 4


def test_jecl_scores_have_agreement_and_its_product():
    data, y = blobs(n_per=30)
    model = make_clusterer("jecl", 4, {"image_ae": {"epochs": 5}, "text_ae": {"epochs": 5},
                                       "cluster": {"max_iter": 60}}, seed=0).fit(data)
    s = label_free_scores(model, data, model.labels_)
    assert 0 <= s["agreement"] <= 1 and s["silhouette_agreement"] == pytest.approx(s["silhouette"] * s["agreement"])
    gate = s["silhouette"] if s["agreement"] >= 0.5 else s["silhouette"] - 2
    assert s["agreed_silhouette"] == pytest.approx(gate)
    dec = make_clusterer("dec", 4, {"ae": {"epochs": 2}, "cluster": {"max_iter": 10}}, seed=0).fit(data)
    assert "agreement" not in label_free_scores(dec, data, dec.labels_)
    assert resolve_score(load_config().tune, "jecl") == "agreed_silhouette"
    with pytest.raises(ConfigError):
        resolve_score(load_config(None, ["tune.score=agreement"]).tune, "dec")


def test_agreement_is_a_gate_not_a_factor():
    # views that agree rank by silhouette alone, above every clustering whose views do not agree
    assert agreed_silhouette(0.05, 0.6) == 0.05 and agreed_silhouette(0.05, 0.99) == 0.05
    assert agreed_silhouette(0.30, 0.2) == pytest.approx(-1.70)
    assert agreed_silhouette(0.30, 0.2) < agreed_silhouette(-0.9, 0.5)
    assert agreed_silhouette(0.30, 0.2, floor=0.1) == 0.30
    assert np.isnan(agreed_silhouette(float("nan"), 0.9)) and np.isnan(agreed_silhouette(0.1, float("nan")))
    with pytest.raises(ConfigError, match="agreement_floor"):
        load_config(None, ["tune.agreement_floor=1.5"])


def test_score_sample_is_keyed_bounded_and_order_free():
    ids = np.array([f"id{j}" for j in range(5000)], dtype=object)
    m = score_mask(ids, 5000, 300, seed=3)
    assert m.sum() == 300
    perm = np.random.default_rng(0).permutation(5000)
    assert set(ids[perm][score_mask(ids[perm], 5000, 300, seed=3)]) == set(ids[m])  # the same items in any order
    # the rows the workers keep (the share under keep_fraction, as raymmc.sweep.score_sample draws them), trimmed on
    # the driver, are the same items as the trial's mask over all rows
    import pyarrow as pa

    from raymmc.hashing import keep_fraction
    from raymmc.train.tune import trial_sample_filter

    kept = trial_sample_filter(pa.table({"id": list(ids)}), fraction=keep_fraction(300, 5000), seed=3 ^ 0x5C0E)
    part = np.array(kept.column("id").to_pylist(), dtype=object)
    assert 300 <= len(part) < 5000 and set(part[score_mask(part, 5000, 300, seed=3)]) == set(ids[m])
    assert score_mask(ids[:100], 100, 300, seed=3).all()  # fewer items than the sample: all of them


def test_trial_fit_and_scorer_are_deterministic():
    data, y = blobs()
    setup = TrialSetup(algorithm="kmeans", clusters=(3, 5), base_params={}, space=tune_space.space("kmeans", None),
                       score="silhouette", seed=0, pixel_channels=1, n_total=len(y), score_rows=100,
                       report_steps=10, threads=1)
    point, k = point_of({"image_weight": 2.0, "nredo": 5, "clusters": 4}, setup)
    assert point == {"image_weight": 2.0, "nredo": 5} and k == 4
    labels = np.array([str(v) for v in y], dtype=object)
    a = Scorer(data, labels, setup)(fit_point(data, point, k, setup))
    b = Scorer(data, labels, setup)(fit_point(data, point, k, setup))
    assert a == b and a["score"] == a["silhouette"] and a["nmi"] > 0.9
    assert len(Scorer(data, labels, setup).rows) == 100


def test_choose_best_takes_completed_trials_only_and_spearman():
    rows = [{"trial_id": "a", "score": 0.9, "completed": False, "nmi": 0.1},
            {"trial_id": "b", "score": 0.5, "completed": True, "nmi": 0.5},
            {"trial_id": "c", "score": 0.7, "completed": True, "nmi": 0.6},
            {"trial_id": "d", "score": float("nan"), "completed": True, "nmi": 0.9},
            {"trial_id": "e", "score": 0.2, "completed": True, "nmi": 0.2}]
    assert choose_best(rows)["trial_id"] == "c"
    assert choose_best([rows[0]]) is None
    rho, n = spearman([r for r in rows if r["completed"]])
    assert n == 3 and rho == pytest.approx(1.0)
    assert spearman(rows[:2]) == (None, 2)


def test_the_winner_config_carries_the_point():
    cfg = load_config(None, ["cluster.algorithm=jecl", "cluster.params.jecl.beta=0.2"])
    specs = tune_space.space("jecl", None)
    out = with_point(cfg, {"lam": 0.4, "latent": 16}, 7, specs)
    jecl = out.cluster.params["jecl"]
    assert out.cluster.clusters == 7 and jecl["lam"] == 0.4 and jecl["beta"] == 0.2
    assert jecl["image_ae"]["latent"] == jecl["text_ae"]["latent"] == 16
    km = with_point(load_config(), {"image_weight": 0.5}, 5, tune_space.space("kmeans", None))
    assert km.cluster.kmeans.image_weight == 0.5 and km.cluster.kmeans.niter == 100


def test_kmeans_image_weight_changes_only_the_concatenation():
    data, _ = blobs()
    base = make_clusterer("kmeans", 4, {}, seed=0).fit(data)
    same = make_clusterer("kmeans", 4, {"image_weight": 1.0}, seed=0).fit(data)
    assert np.array_equal(base.labels_, same.labels_)
    heavy = make_clusterer("kmeans", 4, {"image_weight": 3.0}, seed=0).fit(data)
    emb = heavy.embed(data)
    assert np.allclose(np.linalg.norm(emb[:, :12], axis=1), 3.0, atol=1e-5)  # the image block, weighted
    assert np.allclose(np.linalg.norm(emb[:, 12:], axis=1), 1.0, atol=1e-5)
    assert heavy.warm_start_signature()["image_weight"] == 3.0  # another weighting: a cold start, not a warm one
