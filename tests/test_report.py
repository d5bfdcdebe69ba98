"""The HTML cluster report: c-TF-IDF by hand, image helpers, and a real report of 60 tuxpaint
stamps (3 classes) checked as parsed HTML and, where Chromium is installed, as a screenshot."""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymmc.io.rundir import RunDir
from raymmc.report.embedding_map import embedding_map
from raymmc.report.html import _distinct_texts
from raymmc.report.html import write_report as render
from raymmc.report.images import load_images, thumbnail
from raymmc.report.metrics import evaluate
from raymmc.report.summary import (Example, ReportSummary, SummaryLimits, clusters_table, join_items, merge,
                                   summarize, summarize_block)
from raymmc.report.terms import analyzer, ctfidf, top_terms, top_terms_from_counts
from raymmc.train.sample import MapSample, sample_mask, with_sample

LIMITS = SummaryLimits(candidates=48, max_terms=10_000, map_points=3000, seed=0)


def write_report(rundir, assignments, items, embedding, *, top_images=12, map_points=3000, **kwargs):
    """The report of row-aligned per-item tables, through the same bounded summary a run merges."""
    limits = SummaryLimits(candidates=48, max_terms=10_000, map_points=map_points, seed=0)
    return render(rundir, summarize(assignments, items, embedding, limits), top_images=top_images, **kwargs)

CLASSES = ("animals", "food", "town")


# --- c-TF-IDF -----------------------------------------------------------------------------------

def test_ctfidf_hand_computed():
    # Stop words ("the", "and") and one-letter/digit tokens are not counted. Counted words:
    # cluster 0: apple x2, banana x1; cluster 1: banana x1, cherry x1 -> 5 words, A = 5/2 = 2.5.
    # f = apple 2, banana 2, cherry 1.
    docs = ["The apple, apple and a banana 42", "banana and the cherry"]
    weights, vocab = ctfidf(docs)
    assert vocab == ["apple", "banana", "cherry"]
    expected = np.array([[2 * math.log(1 + 2.5 / 2), 1 * math.log(1 + 2.5 / 2), 0.0],
                         [0.0, 1 * math.log(1 + 2.5 / 2), 1 * math.log(1 + 2.5 / 1)]])
    np.testing.assert_allclose(weights, expected)
    top = top_terms(docs, n=5)
    assert [t for t, _ in top[0]] == ["apple", "banana"]  # absent cherry (weight 0) not listed
    assert [t for t, _ in top[1]] == ["cherry", "banana"]
    assert top[1][0][1] == pytest.approx(math.log(3.5))


def test_top_terms_ties_empty_and_stopword_only():
    assert top_terms(["zebra yak", "yak zebra"], n=2) == top_terms(["yak zebra", "zebra yak"], n=2)
    assert [t for t, _ in top_terms(["zebra yak", "yak zebra"])[0]] == ["yak", "zebra"]  # tie -> alphabetical
    assert top_terms(["", "the and of"]) == [[], []]
    assert top_terms(["", "lonely words"])[0] == []


# --- images and map ----------------------------------------------------------------------------

def _png(mode: str, color, size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _decode_data_uri(uri: str) -> Image.Image:
    import base64

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_thumbnail_shrinks_and_composites_alpha_on_white():
    uri = thumbnail(_png("RGBA", (0, 0, 0, 0)), 128)  # fully transparent: must come out white, not black
    im = _decode_data_uri(uri).convert("RGB")
    assert max(im.size) == 128 and im.size == (128, 85)
    assert im.getpixel((5, 5)) == (255, 255, 255)
    assert thumbnail(b"not an image") is None and thumbnail(None) is None and thumbnail(b"") is None


def test_load_images_reads_only_the_wanted_rows(tmp_path):
    blobs = [_png("RGB", (i, 0, 0), (4, 4)) for i in range(10)]
    blobs[3] = None
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "image": pa.array(blobs, pa.binary())}),
                   path, row_group_size=3)  # several row groups: rows must map across them
    pq.write_table(pa.table({"id": ["x"], "caption": ["text only"]}), tmp_path / "text.parquet")
    pairs = [(str(path), 7), (str(path), 0), (str(path), 3), (str(tmp_path / "text.parquet"), 0),
             (str(tmp_path / "missing.parquet"), 0), (str(path), 99), (str(path), 7)]
    assert load_images(pairs) == [blobs[7], blobs[0], None, None, None, None, blobs[7]]


def test_embedding_map_samples_and_handles_tiny_inputs():
    rng = np.random.default_rng(0)
    m = embedding_map(rng.normal(size=(120, 64)).astype(np.float32), seed=1, max_points=40)
    assert m.xy.shape == (40, 2) and len(set(m.index)) == 40 and np.all(np.diff(m.index) > 0)
    assert "t-SNE" in m.method and "PCA 64→50-d" not in m.method  # 40 points: no PCA step
    again = embedding_map(rng.normal(size=(120, 64)).astype(np.float32), seed=1, max_points=40)
    assert np.array_equal(m.index, again.index)  # the sample depends on the seed only
    assert embedding_map(rng.normal(size=(3, 5)), seed=0).xy.shape == (3, 2)  # too few for t-SNE
    assert embedding_map(np.ones((1, 1)), seed=0).xy.shape == (1, 2)


# --- a real report ------------------------------------------------------------------------------

class _Page(HTMLParser):
    """Tags with attributes, cluster sections with their visible text, and all visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.sections: list[dict] = []
        self.text: list[str] = []
        self._skip = 0
        self._depth = 0  # <section> nesting while inside a cluster section

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "section":
            if "cluster" in (a.get("class") or "").split():
                self.sections.append({"attrs": a, "text": [], "imgs": 0, "lis": 0})
                self._depth = 1
            elif self._depth:
                self._depth += 1
        elif self._depth and tag == "img":
            self.sections[-1]["imgs"] += 1
        elif self._depth and tag == "li":
            self.sections[-1]["lis"] += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        if tag == "section" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._depth:
            self.sections[-1]["text"].append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    for s in p.sections:
        s["text"] = " ".join(" ".join(s["text"]).split())
    return p


def _histograms(images: list[bytes]) -> np.ndarray:
    """8-bin per-channel colour histograms of the RGB-on-white 32x32 image: a cheap, real embedding."""
    feats = []
    for data in images:
        im = Image.open(io.BytesIO(data)).convert("RGBA").resize((32, 32))
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        px = np.asarray(flat).reshape(-1, 3)
        feats.append(np.concatenate([np.histogram(px[:, c], bins=8, range=(0, 256))[0] for c in range(3)]))
    return np.asarray(feats, dtype=np.float32) / 1024.0


@pytest.fixture(scope="module")
def tux_run(tux_items, tmp_path_factory):
    """60 stamps of 3 classes in a Parquet file; clusters = classes with 4 items swapped; the
    embedding a seeded random projection of colour histograms; two items marked text-only."""
    root = tmp_path_factory.mktemp("report")
    labels = np.array(tux_items.labels)
    keep = [int(i) for c in CLASSES for i in np.flatnonzero(labels == c)[:20]]
    ids = [tux_items.ids[i] for i in keep]
    images = [tux_items.images[i] for i in keep]
    captions = [tux_items.captions[i] for i in keep]
    lab = [tux_items.labels[i] for i in keep]
    source = str(root / "part-00000.parquet")
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary()), "caption": captions,
                             "label": lab}), source, row_group_size=16)

    cluster = np.array([CLASSES.index(v) for v in lab], dtype=np.int64)
    cluster[[0, 1]] = 1  # two animals land in the food cluster, two food items in town
    cluster[[20, 21]] = 2
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.4, 1.0, size=len(ids)).astype(np.float32)
    has_image = np.ones(len(ids), dtype=bool)
    has_image[[5, 45]] = False  # e.g. their image failed to decode: shown as text
    embedding = _histograms(images) @ rng.normal(size=(24, 16)).astype(np.float32)
    assignments = pa.table({"id": ids, "cluster": cluster, "confidence": confidence, "has_image": has_image,
                            "has_text": np.ones(len(ids), dtype=bool),
                            "note": ["image: not decodable" if not h else "" for h in has_image]})
    items = pa.table({"id": ids, "caption": captions, "label": lab, "source": [source] * len(ids),
                      "row": np.arange(len(ids))})
    metrics = {**evaluate(lab, cluster), "n_labeled": len(ids)}
    rundir = RunDir(str(root / "run")).create()
    calls: list[int] = []

    def loader(pairs):
        calls.append(len(pairs))
        return load_images(pairs)

    uri = write_report(rundir, assignments, items, embedding, metrics=metrics, image_loader=loader,
                       title="tuxpaint <test> report", top_images=12)
    return {"rundir": rundir, "uri": uri, "cluster": cluster, "has_image": has_image, "captions": captions,
            "lab": lab, "assignments": assignments, "items": items, "embedding": embedding, "calls": calls}


def test_report_files_and_self_contained(tux_run):
    rundir, uri = tux_run["rundir"], tux_run["uri"]
    assert uri == rundir.path("report", "index.html")
    with Image.open(io.BytesIO(rundir.read_bytes("report/summary.png"))) as im:
        assert im.format == "PNG" and im.size[0] > 800
    page = rundir.read_bytes("report/index.html").decode("utf-8")
    p = _parse(page)
    for tag, attrs in p.tags:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
    assert not [t for t, a in p.tags if t in ("script", "link", "iframe")]
    imgs = [a["src"] for t, a in p.tags if t == "img"]
    assert imgs and all(s.startswith("data:image/") for s in imgs)
    # map + size chart + 12 most confident images of each cluster that has >= 12 with an image
    with_image = Counter(tux_run["cluster"][tux_run["has_image"]].tolist())
    assert len(imgs) == 2 + sum(min(12, v) for v in with_image.values())
    assert tux_run["calls"] == [sum(min(12, v) for v in with_image.values())]  # one loader call
    assert "tuxpaint &lt;test&gt; report" in page  # the title is escaped


def test_report_one_section_per_cluster(tux_run):
    p = _parse(tux_run["rundir"].read_bytes("report/index.html").decode())
    sizes = Counter(tux_run["cluster"].tolist())
    assert [int(s["attrs"]["data-cluster"]) for s in p.sections] == sorted(sizes, key=lambda c: (-sizes[c], c))
    lab = np.array(tux_run["lab"])
    for s in p.sections:
        c = int(s["attrs"]["data-cluster"])
        assert int(s["attrs"]["data-size"]) == sizes[c]
        assert f"Cluster {c} {sizes[c]} items" in s["text"]
        assert s["imgs"] == 12
        members = tux_run["cluster"] == c
        counts = Counter(lab[members].tolist())
        majority, top = counts.most_common(1)[0]
        assert f"purity {top / members.sum():.0%} · majority {majority}" in s["text"]
        text_only = int((members & ~tux_run["has_image"]).sum())
        assert s["lis"] == text_only
        if text_only:
            assert f"{text_only} item without an image" in s["text"]
    # Top terms: each cluster's are the c-TF-IDF of its captions.
    caps = tux_run["captions"]
    order = [int(s["attrs"]["data-cluster"]) for s in p.sections]
    expected = top_terms([" ".join(caps[i] for i in np.flatnonzero(tux_run["cluster"] == c)) for c in order], n=8)
    for s, terms in zip(p.sections, expected):
        assert terms and "Top terms " + " ".join(t for t, _ in terms) in s["text"]
    text = " ".join(p.text)
    for name in ("ACC", "NMI", "ARI", "Purity", "F-score"):
        assert name in text


def test_report_without_labels_or_images(tux_run, tmp_path):
    """No labels: no purity anywhere. A cluster none of whose items has an image lists its captions."""
    items = tux_run["items"].set_column(2, "label", pa.nulls(60, pa.string()))
    a = tux_run["assignments"]
    has_image = np.array(a.column("has_image").to_pylist()) & (tux_run["cluster"] != 2)
    a = a.set_column(3, "has_image", pa.array(has_image))
    embedding = tux_run["embedding"].copy()
    embedding[7] = np.nan  # a broken feature row must not cost the run its report
    rundir = RunDir(str(tmp_path / "run")).create()
    write_report(rundir, a, items, embedding, metrics={"n_assigned": 60}, image_loader=load_images,
                 title="an unlabelled $5 archive", top_images=5)  # "$": no matplotlib mathtext
    p = _parse(rundir.read_bytes("report/index.html").decode())
    text = " ".join(p.text).lower()
    assert "purity" not in text and "majority" not in text and "labels" not in text
    assert not any("labels-block" in (at.get("class") or "") for _, at in p.tags)
    by_id = {int(s["attrs"]["data-cluster"]): s for s in p.sections}
    assert by_id[2]["imgs"] == 0 and by_id[2]["lis"] == 5 and "Text-only cluster" in by_id[2]["text"]
    assert by_id[0]["imgs"] == 5 and by_id[1]["imgs"] == 5

    # A loader that finds nothing (files moved): clusters fall back to their captions.
    rundir3 = RunDir(str(tmp_path / "run3")).create()
    write_report(rundir3, a, items, tux_run["embedding"], metrics={}, image_loader=lambda pairs: [None] * len(pairs),
                 title="t", top_images=4)
    p3 = _parse(rundir3.read_bytes("report/index.html").decode())
    assert [s["imgs"] for s in p3.sections] == [0, 0, 0] and all(s["lis"] == 4 for s in p3.sections)
    assert sum("could not be loaded" in s["text"] for s in p3.sections) == 2  # cluster 2 is text-only

    # Without an image loader every cluster shows captions.
    rundir2 = RunDir(str(tmp_path / "run2")).create()
    write_report(rundir2, a, items, tux_run["embedding"], metrics={}, image_loader=None, title="t", top_images=4)
    p2 = _parse(rundir2.read_bytes("report/index.html").decode())
    assert [s["imgs"] for s in p2.sections] == [0, 0, 0] and [s["lis"] for s in p2.sections] == [4, 4, 4]


def test_text_lists_collapse_repeated_captions():
    caps = ["A flower.", "a  flower.", "Red rose.", "A flower.", "Tulip."]
    got = _distinct_texts([Example(str(i), 1.0, c, "f", i, "", False, True) for i, c in enumerate(caps)], 2)
    assert [(c, k) for c, _, k in got] == [("A flower.", 3), ("Red rose.", 1)]
    assert "id: 0" in got[0][1]


# --- the bounded summary (what the prediction workers build and merge) ---------------------------

WORDS = "rose tulip daisy harbour boat sail castle tower bridge apple pear the of and".split()


def _synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"item-{i:05d}" for i in range(n)]
    cluster = rng.integers(0, 5, size=n)
    has_image = rng.random(n) > 0.3
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(0, 6))) for _ in range(n)]
    labels = [None if rng.random() < 0.2 else f"class-{int(c + rng.integers(0, 2)) % 5}" for c in cluster]
    assignments = pa.table({"id": ids, "cluster": cluster, "confidence": rng.random(n).astype(np.float32),
                            "has_image": has_image, "has_text": [bool(c) for c in captions],
                            "note": ["" if h else "image: missing" for h in has_image]})
    items = pa.table({"caption": captions, "label": pa.array(labels, pa.string()), "source": ["s.parquet"] * n,
                      "row": np.arange(n)})
    return assignments, items, rng.normal(size=(n, 6)).astype(np.float32)


def _blocks(a, items, emb, limits, seed):
    """The summary as the workers build it: random block sizes, each summarised alone (the embedding of
    the sampled rows only), merged in a random order after a JSON round trip."""
    table = join_items(a, items)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(emb)), size=7, replace=False))
    parts = []
    for lo, hi in zip([0, *cuts], [*cuts, len(emb)]):
        block = table.slice(lo, hi - lo)
        keys, mask = sample_mask(block.column("id").to_pylist(), MapSample(limits.map_points, limits.seed, len(emb)))
        parts.append(summarize_block(with_sample(block, keys, mask, emb[lo:hi][mask]), limits).to_json())
    out = ReportSummary(limits)
    for i in rng.permutation(len(parts)):
        out = merge(out, ReportSummary.from_json(parts[i]))
    return out


def _comparable(summary: ReportSummary) -> dict:
    return {c: (s.n, s.n_image, s.n_text, round(s.confidence_sum, 3), s.labels, s.terms, s.words,
                [e.id for e in s.with_image], [e.id for e in s.without_image])
            for c, s in summary.clusters.items()} | {"sample": [(p.key, p.cluster) for p in summary.sample]}


def test_summary_is_the_same_whatever_the_blocks():
    a, items, emb = _synthetic(600)
    limits = SummaryLimits(candidates=10, max_terms=10_000, map_points=100, seed=3)
    whole = summarize(a, items, emb, limits)
    assert _comparable(_blocks(a, items, emb, limits, 1)) == _comparable(whole)
    assert _comparable(_blocks(a, items, emb, limits, 2)) == _comparable(whole)
    clusters = np.asarray(a.column("cluster"))
    conf = np.asarray(a.column("confidence"))
    has_image = np.asarray(a.column("has_image"))
    for c, s in whole.clusters.items():
        members = np.flatnonzero((clusters == c) & has_image)
        best = members[np.lexsort((members, -conf[members]))][:10]
        assert [e.id for e in s.with_image] == [f"item-{i:05d}" for i in best]  # ids sort like rows here
        assert s.n == int((clusters == c).sum()) and s.n_image == int(((clusters == c) & has_image).sum())
    # The map: exactly the bottom map_points keys of all ids, each with its own cluster and vector.
    keys, _ = sample_mask(a.column("id").to_pylist(), MapSample(100, 3, 600))
    bottom = np.argsort(keys)[:100]
    assert [p.key for p in whole.sample] == sorted(int(k) for k in keys[bottom])
    row = {int(k): i for i, k in enumerate(keys)}
    for p in whole.sample[:5]:
        assert p.cluster == clusters[row[p.key]] and np.allclose(p.vector, emb[row[p.key]])
    # The label x cluster counts the metrics come from.
    labels = items.column("label").to_pylist()
    names, ids, table, unlabeled = whole.contingency()
    for i, v in enumerate(names):
        for j, c in enumerate(ids):
            assert table[i, j] == sum(1 for lab, k in zip(labels, clusters) if lab == v and k == c)
    assert unlabeled.tolist() == [sum(1 for lab, k in zip(labels, clusters) if lab is None and k == c) for c in ids]
    # Another seed draws another sample.
    other = summarize(a, items, emb, SummaryLimits(candidates=10, max_terms=10_000, map_points=100, seed=4))
    assert {p.key for p in other.sample} != {p.key for p in whole.sample}


def test_summary_terms_equal_ctfidf_of_the_joined_captions_and_cap_keeps_the_most_frequent():
    a, items, emb = _synthetic(300, seed=5)
    whole = summarize(a, items, emb, LIMITS)
    caps, clusters = items.column("caption").to_pylist(), np.asarray(a.column("cluster"))
    order = sorted(whole.clusters)
    docs = [" ".join(caps[i] for i in np.flatnonzero(clusters == c)) for c in order]
    counts = [whole.clusters[c].terms for c in order]
    assert top_terms_from_counts(counts, [whole.clusters[c].words for c in order], n=5) == top_terms(docs, n=5)
    assert counts[0] == dict(Counter(analyzer()(docs[0])))  # stop words ("the", "of", "and") not counted
    capped = summarize(a, items, emb, SummaryLimits(candidates=48, max_terms=3, map_points=0, seed=0))
    for c in order:
        full, kept = whole.clusters[c].terms, capped.clusters[c].terms
        assert len(kept) == 3 and capped.clusters[c].words == whole.clusters[c].words
        assert min(kept.values()) >= sorted(full.values(), reverse=True)[2]
    assert capped.sample == []  # map_points 0: no embeddings asked for


def test_clusters_table():
    a, items, emb = _synthetic(400, seed=7)
    table = clusters_table(summarize(a, items, emb, LIMITS), n_terms=4, n_ids=3)
    clusters, conf = np.asarray(a.column("cluster")), np.asarray(a.column("confidence"))
    sizes = Counter(clusters.tolist())
    assert table.column("cluster").to_pylist() == sorted(sizes, key=lambda c: (-sizes[c], c))
    assert table.column("size").to_pylist() == [sizes[c] for c in table.column("cluster").to_pylist()]
    labels = items.column("label").to_pylist()
    for row in table.to_pylist():
        members = np.flatnonzero(clusters == row["cluster"])
        assert row["mean_confidence"] == pytest.approx(float(conf[members].mean()), rel=1e-5)
        best = members[np.lexsort((members, -conf[members]))][:3]
        assert row["representative_ids"] == [f"item-{i:05d}" for i in best]
        counted = Counter(labels[i] for i in members if labels[i] is not None)
        top, k = min(counted.items(), key=lambda kv: (-kv[1], kv[0]))
        assert row["majority_label"] == top and row["purity"] == pytest.approx(k / sum(counted.values()))
        assert 0 < len(row["top_terms"]) <= 4


def test_summary_merged_on_the_workers_equals_the_driver_merge(ray_session, monkeypatch):
    """The prediction rows carry one summary per batch; above DRIVER_MERGE_ROWS they are merged in a tree of
    Ray Data tasks (here forced, with a fan-in of 3): the same summary as the driver's merge and in-process."""
    from raymmc.report import summary as summary_mod

    a, items, emb = _synthetic(500, seed=11)
    limits = SummaryLimits(candidates=10, max_terms=10_000, map_points=60, seed=1)
    table = join_items(a, items)
    batches = []
    for lo in range(0, 500, 40):  # as the Predictor emits them: its batch's summary on the batch's first row
        block = table.slice(lo, 40)
        keys, mask = sample_mask(block.column("id").to_pylist(), MapSample(60, 1, 500))
        text = summary_mod.block_summary(with_sample(block, keys, mask, emb[lo:lo + 40][mask]), limits)
        batches.append(a.slice(lo, 40).append_column("summary", pa.array([text] + [None] * (block.num_rows - 1), pa.string())))
    ds = ray_session.data.from_arrow(batches).materialize()
    driver = summary_mod.summarize_dataset(ds, limits)
    monkeypatch.setattr(summary_mod, "DRIVER_MERGE_ROWS", 0)
    monkeypatch.setattr(summary_mod, "MERGE_FANIN", 3)
    workers = summary_mod.summarize_dataset(ds, limits)
    assert _comparable(workers) == _comparable(driver) == _comparable(summarize(a, items, emb, limits))
    assert len(driver.sample) == 60


def test_report_map_is_a_bounded_sample(tux_run, tmp_path):
    rundir = RunDir(str(tmp_path / "run")).create()
    write_report(rundir, tux_run["assignments"], tux_run["items"], tux_run["embedding"], metrics={},
                 image_loader=None, title="t", top_images=4, map_points=25)
    page = rundir.read_bytes("report/index.html").decode()
    assert "a uniform sample (keyed hash of the id) of 25 of 60 items" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian package 'chromium' (apt-get install chromium) "
                                               "to render the report headlessly")
def test_report_renders_in_headless_chromium(tux_run, tmp_path):
    shot = tmp_path / "shot.png"
    path = tux_run["rundir"].path("report", "index.html")
    # No network, no profile, no GPU: the page must render from the file alone.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2400",
           f"file://{path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"no screenshot; chromium exit {proc.returncode}: {proc.stderr[-2000:]}"
    with Image.open(shot) as im:
        assert im.size == (1400, 2400)
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.std() > 20  # not blank: text, charts and thumbnails
    # Colour appears (charts, thumbnails), not just grey text.
    assert (np.abs(px[..., 0] - px[..., 2]) > 60).mean() > 0.005
