"""A bounded summary of a clustering, for the report and ``clusters.parquet``: built block by block where the
assignments are (the prediction workers) and merged, so the driver never holds a per-item array.

Per cluster: its size, confidence sum, modality counts, label counts, caption term counts (for c-TF-IDF) and
its most confident items. For the 2-D map: the bottom ``map_points`` keys of the rows the prediction workers
embedded (:mod:`raymmc.train.sample`), a uniform sample whatever the blocks or the worker count. Everything is
JSON (no pickle): it crosses the object store and could be stored as data.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from raymmc.report.terms import analyzer


@dataclass(frozen=True)
class SummaryLimits:
    """How much of each cluster the summary keeps (the driver's memory is O(K x these)); the defaults and
    why they are what they are: ``raymmc.config.SummaryConfig``."""

    candidates: int  # most confident items kept per cluster, with and without an image each
    max_terms: int  # distinct caption terms kept per cluster (the most frequent)
    map_points: int  # the map's sample size
    seed: int  # keys the map sample's hash (raymmc.train.sample)


@dataclass
class Example:
    """One item a cluster card may show."""

    id: str
    confidence: float
    caption: str
    source: str
    row: int
    note: str
    has_image: bool
    has_text: bool

    def rank(self) -> tuple[float, str]:  # most confident first; ties by id, so any merge order agrees
        return (-self.confidence, self.id)


@dataclass
class ClusterSummary:
    n: int = 0
    confidence_sum: float = 0.0
    n_image: int = 0
    n_text: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # labelled items per label
    terms: dict[str, int] = field(default_factory=dict)  # caption term counts (analyzer of report.terms)
    words: int = 0  # all counted terms, also those dropped by max_terms
    with_image: list[Example] = field(default_factory=list)  # most confident first
    without_image: list[Example] = field(default_factory=list)

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.n if self.n else 0.0


@dataclass
class MapPoint:
    key: int  # the keyed hash of the id (uint64)
    cluster: int
    vector: list[float]


@dataclass
class ReportSummary:
    limits: SummaryLimits
    clusters: dict[int, ClusterSummary] = field(default_factory=dict)
    sample: list[MapPoint] = field(default_factory=list)  # ascending key, at most limits.map_points
    nodes: list[str] = field(default_factory=list)  # the Ray nodes that predicted the rows, sorted

    @property
    def n(self) -> int:
        return sum(c.n for c in self.clusters.values())

    def to_json(self) -> str:
        return json.dumps({"limits": asdict(self.limits),
                           "clusters": {str(c): asdict(s) for c, s in self.clusters.items()},
                           "sample": [asdict(p) for p in self.sample], "nodes": self.nodes})

    @classmethod
    def from_json(cls, text: str) -> "ReportSummary":
        raw = json.loads(text)
        clusters = {}
        for c, s in raw["clusters"].items():
            s["with_image"] = [Example(**e) for e in s["with_image"]]
            s["without_image"] = [Example(**e) for e in s["without_image"]]
            clusters[int(c)] = ClusterSummary(**s)
        return cls(SummaryLimits(**raw["limits"]), clusters, [MapPoint(**p) for p in raw["sample"]], raw["nodes"])

    def largest_first(self) -> list[int]:
        """The cluster ids by size, largest first; ties by id, so the order is deterministic."""
        return sorted(self.clusters, key=lambda c: (-self.clusters[c].n, c))

    def top_terms(self, order: list[int], n: int) -> list[list[tuple[str, float]]]:
        """Each cluster's ``n`` best c-TF-IDF ``(term, weight)``, for the clusters ``order``."""
        from raymmc.report.terms import top_terms_from_counts

        return top_terms_from_counts([self.clusters[c].terms for c in order], [self.clusters[c].words for c in order],
                                     n=n)

    def contingency(self) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
        """``(labels, clusters, table, unlabeled)``: labelled items per (label, cluster), both sorted, and
        the unlabelled items per cluster: what the metrics are computed from."""
        clusters = sorted(self.clusters)
        labels = sorted({v for s in self.clusters.values() for v in s.labels})
        table = np.array([[self.clusters[c].labels.get(v, 0) for c in clusters] for v in labels],
                         dtype=np.int64).reshape(len(labels), len(clusters))
        unlabeled = np.array([self.clusters[c].n for c in clusters], dtype=np.int64) - table.sum(axis=0)
        return labels, clusters, table, unlabeled


def _top(examples: list[Example], k: int) -> list[Example]:
    return sorted(examples, key=Example.rank)[:k]


def _cap_terms(terms: dict[str, int], k: int) -> dict[str, int]:
    if len(terms) <= k:
        return terms
    return dict(sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))[:k])


def summarize_block(table: pa.Table, limits: SummaryLimits) -> ReportSummary:
    """The summary of one block of assignments joined with their items: columns ``id, cluster, confidence,
    has_image, has_text, note, label, caption, source, row`` and, for the map, ``sample_key`` (uint64) and
    ``embedding`` (a list of floats on the sampled candidates, null elsewhere; both optional)."""
    out = ReportSummary(limits)
    if table.num_rows == 0:
        return out
    col = {name: table.column(name).to_pylist() for name in
           ("id", "cluster", "confidence", "has_image", "has_text", "note", "label", "caption", "source", "row")}
    analyze = analyzer()
    for i, c in enumerate(col["cluster"]):
        s = out.clusters.setdefault(int(c), ClusterSummary())
        s.n += 1
        s.confidence_sum += float(col["confidence"][i])
        s.n_image += bool(col["has_image"][i])
        s.n_text += bool(col["has_text"][i])
        if col["label"][i] is not None:
            label = str(col["label"][i])
            s.labels[label] = s.labels.get(label, 0) + 1
        caption = col["caption"][i] or ""
        if caption:
            tokens = analyze(caption)
            s.words += len(tokens)
            for t in tokens:
                s.terms[t] = s.terms.get(t, 0) + 1
        ex = Example(str(col["id"][i]), float(col["confidence"][i]), caption, str(col["source"][i]),
                     int(col["row"][i]), col["note"][i] or "", bool(col["has_image"][i]), bool(col["has_text"][i]))
        (s.with_image if ex.has_image else s.without_image).append(ex)
    for s in out.clusters.values():
        s.with_image = _top(s.with_image, limits.candidates)
        s.without_image = _top(s.without_image, limits.candidates)
        s.terms = _cap_terms(s.terms, limits.max_terms)
    if "node" in table.column_names:
        out.nodes = sorted(set(table.column("node").to_pylist()))
    if "embedding" in table.column_names and "sample_key" in table.column_names:
        points = [MapPoint(int(k), int(c), [float(v) for v in vec])
                  for k, c, vec in zip(table.column("sample_key").to_pylist(), col["cluster"],
                                       table.column("embedding").to_pylist()) if vec is not None]
        out.sample = sorted(points, key=lambda p: p.key)[: limits.map_points]
    return out


def merge(a: ReportSummary, b: ReportSummary) -> ReportSummary:
    """The summary of both parts (associative and commutative up to float rounding of confidence sums)."""
    limits = a.limits
    out = ReportSummary(limits)
    for c in sorted(set(a.clusters) | set(b.clusters)):
        x, y = a.clusters.get(c, ClusterSummary()), b.clusters.get(c, ClusterSummary())
        out.clusters[c] = ClusterSummary(
            n=x.n + y.n, confidence_sum=x.confidence_sum + y.confidence_sum, n_image=x.n_image + y.n_image,
            n_text=x.n_text + y.n_text, labels=dict(Counter(x.labels) + Counter(y.labels)),
            terms=_cap_terms(dict(Counter(x.terms) + Counter(y.terms)), limits.max_terms), words=x.words + y.words,
            with_image=_top(x.with_image + y.with_image, limits.candidates),
            without_image=_top(x.without_image + y.without_image, limits.candidates))
    out.sample = sorted(a.sample + b.sample, key=lambda p: p.key)[: limits.map_points]
    out.nodes = sorted(set(a.nodes) | set(b.nodes))
    return out


def merge_all(parts: Iterable[ReportSummary], limits: SummaryLimits) -> ReportSummary:
    out = ReportSummary(limits)
    for p in parts:
        out = merge(out, p)
    return out


def summarize(assignments: pa.Table, items: pa.Table, embedding: np.ndarray, limits: SummaryLimits
              ) -> ReportSummary:
    """In-process summary of row-aligned ``assignments`` (id, cluster, confidence, has_image, has_text, note),
    ``items`` (caption, label, source, row) and ``embedding`` (n, d): the same result the workers' blocks merge
    to, for notebooks and tests."""
    n = assignments.num_rows
    if items.num_rows != n or len(embedding) != n:
        raise ValueError(f"assignments ({n} rows), items ({items.num_rows}) and embedding ({len(embedding)}) "
                         "must be row-aligned")
    from raymmc.train.sample import MapSample, sample_mask, with_sample

    table = join_items(assignments, items)
    keys, mask = sample_mask(table.column("id").to_pylist(), MapSample(limits.map_points, limits.seed, n))
    return summarize_block(with_sample(table, keys, mask, np.asarray(embedding)[mask]), limits)


def join_items(assignments: pa.Table, items: pa.Table) -> pa.Table:
    """Row-aligned assignments and items as one table with every column :func:`summarize_block` reads."""
    n = assignments.num_rows

    def col(t: pa.Table, name: str, default: object, type_: pa.DataType) -> pa.Array:
        return t.column(name) if name in t.column_names else pa.array([default] * n, type_)

    return pa.table({
        "id": assignments.column("id").cast(pa.string()), "cluster": assignments.column("cluster"),
        "confidence": assignments.column("confidence"),
        "has_image": col(assignments, "has_image", True, pa.bool_()),
        "has_text": col(assignments, "has_text", True, pa.bool_()),
        "note": col(assignments, "note", "", pa.string()), "label": col(items, "label", None, pa.string()),
        "caption": col(items, "caption", "", pa.string()), "source": col(items, "source", "", pa.string()),
        "row": col(items, "row", 0, pa.int64()),
    })


def clusters_table(summary: ReportSummary, *, n_terms: int = 8, n_ids: int = 10) -> pa.Table:
    """``clusters.parquet``: one row per cluster (largest first) for programs: its size, mean confidence,
    modality counts, top c-TF-IDF terms, most confident ids and, where labels exist, its majority label."""
    stats = summary.clusters
    order = summary.largest_first()
    terms = summary.top_terms(order, n_terms)
    n = max(summary.n, 1)
    majority, purity = [], []
    for c in order:
        labels = stats[c].labels
        if labels:
            top, count = min(labels.items(), key=lambda kv: (-kv[1], kv[0]))
            majority.append(top)
            purity.append(count / sum(labels.values()))
        else:
            majority.append(None)
            purity.append(None)
    return pa.table({
        "cluster": pa.array(order, pa.int64()),
        "size": pa.array([stats[c].n for c in order], pa.int64()),
        "share": pa.array([stats[c].n / n for c in order], pa.float64()),
        "mean_confidence": pa.array([stats[c].mean_confidence for c in order], pa.float64()),
        "n_image": pa.array([stats[c].n_image for c in order], pa.int64()),
        "n_text": pa.array([stats[c].n_text for c in order], pa.int64()),
        "top_terms": pa.array([[t for t, _ in ts] for ts in terms], pa.list_(pa.string())),
        "representative_ids": pa.array(
            [[e.id for e in _top(stats[c].with_image + stats[c].without_image, n_ids)] for c in order],
            pa.list_(pa.string())),
        "majority_label": pa.array(majority, pa.string()),
        "purity": pa.array(purity, pa.float64()),
    })


def block_summary(table: pa.Table, limits: SummaryLimits) -> str:
    """:func:`summarize_block` as JSON: what each prediction batch carries (``functools.partial`` it)."""
    return summarize_block(table, limits).to_json()


def _merge_block(batch: pa.Table) -> pa.Table:
    parts = [ReportSummary.from_json(t) for t in batch.column("summary").to_pylist() if t is not None]
    return pa.table({"summary": pa.array([merge_all(parts, parts[0].limits).to_json()] if parts else [],
                                         pa.string())})


# Summaries are merged on the workers, a block's at a time and then this many per task, until so few are left
# that the driver merges them (each holds O(clusters x candidates + map points)).
MERGE_FANIN = 32
# Up to this many prediction rows, the driver streams the summary column (nulls but for one string a batch,
# about 1 bit a row) and merges it itself: the workers' merge tasks cost seconds of start-up on a small run.
DRIVER_MERGE_ROWS = 1_000_000


def summarize_dataset(predicted, limits: SummaryLimits) -> ReportSummary:
    """The summary of a (materialised) Ray Dataset of prediction rows whose ``summary`` column holds their
    batches' summaries (null elsewhere): merged in a tree on the workers; the driver merges the last few."""
    column = predicted.select_columns(["summary"])
    if predicted.count() <= DRIVER_MERGE_ROWS:
        return merge_all((ReportSummary.from_json(t) for b in column.iter_batches(batch_format="pyarrow", batch_size=None)
                          for t in b.column("summary").to_pylist() if t is not None), limits)
    parts = column.map_batches(_merge_block, batch_format="pyarrow", batch_size=None).materialize()
    while (n := parts.count()) > MERGE_FANIN:
        parts = parts.repartition(-(-n // MERGE_FANIN)).map_batches(
            _merge_block, batch_format="pyarrow", batch_size=None).materialize()
    return merge_all((ReportSummary.from_json(r["summary"]) for r in parts.take_all()), limits)
