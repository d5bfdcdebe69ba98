"""The cluster report of a run: ``report/index.html`` (one self-contained page) and
``report/summary.png`` (the embedding map and cluster sizes, for a quick look).

The page opens offline: CSS is inline, every picture is a ``data:`` URI, there is no script.
It shows the run's numbers, an embedding map, and one card per cluster (largest first) with its
top caption terms (c-TF-IDF), its label composition when labels exist, and its most confident
images with their captions (or its captions as a list when the cluster has no images).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from raymmc.io.rundir import RunDir
from raymmc.report import figures
from raymmc.report.embedding_map import embedding_map
from raymmc.report.images import thumbnail
from raymmc.report.summary import ClusterSummary, Example, ReportSummary

ImageLoader = Callable[[list[tuple[str, int]]], list["bytes | None"]]

# Header metrics, in display order: (key in metrics.json, label, what it means).
METRIC_LABELS = (
    ("acc", "ACC", "accuracy under the best one-to-one cluster→class mapping"),
    ("nmi", "NMI", "normalised mutual information"),
    ("ari", "ARI", "adjusted Rand index"),
    ("purity", "Purity", "share of items in their cluster's majority class"),
    ("f_score", "F-score", "pairwise F1"),
)
THUMB_PX = 144  # longest side of a thumbnail
CAPTION_CHARS = 70  # captions under thumbnails are cut here; the full text is in the title
LIST_CHARS = 240  # captions in text lists
MIXED_TEXT_ITEMS = 5  # text-only items listed under an image grid


@dataclass
class ClusterView:
    """What one cluster card shows."""

    cid: int
    size: int
    share: float
    confidence: float
    color: str
    terms: list[tuple[str, float]] = field(default_factory=list)
    labels: list[tuple[str, int]] = field(default_factory=list)  # all labels, most common first
    n_labeled: int = 0
    images: list[tuple[str, str, str]] = field(default_factory=list)  # (data URI, caption, title)
    texts: list[tuple[str, str, int]] = field(default_factory=list)  # (caption, title, occurrences)
    n_text_only: int = 0
    images_failed: bool = False  # it has images, but none could be loaded


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_report(rundir: RunDir, summary: ReportSummary, *, metrics: dict, image_loader: ImageLoader | None,
                 title: str, top_images: int = 12, n_terms: int = 8, drift: dict | None = None) -> str:
    """Write ``report/index.html`` and ``report/summary.png`` under ``rundir``; return the HTML's URI.

    ``summary`` is the run's bounded summary (:mod:`raymmc.report.summary`: per-cluster counts, terms and
    most confident items, and the map's sample of the clustering space). ``image_loader`` maps
    ``[(source, row), ...]`` to encoded image bytes (None where missing); with no loader, clusters show
    captions only. Everything here is O(clusters x shown items + map points), whatever the archive's size.
    ``drift``: a re-clustering's ``drift.json`` (raymmc.report.drift), shown as its own section.
    """
    n = summary.n
    if n == 0:
        raise ValueError("no clustered items to report")
    if top_images > summary.limits.candidates:
        raise ValueError(f"top_images {top_images} > the summary's {summary.limits.candidates} candidates")
    stats = summary.clusters
    order = summary.largest_first()
    colors = dict(zip(sorted(stats), figures.palette(len(stats))))
    terms = summary.top_terms(order, n_terms)
    any_labels = any(s.labels for s in stats.values())

    views: list[ClusterView] = []
    for c, cluster_terms in zip(order, terms):
        s = stats[c]
        view = ClusterView(cid=c, size=s.n, share=s.n / n, confidence=s.mean_confidence, color=colors[c],
                           terms=cluster_terms)
        if any_labels:
            view.labels = sorted(s.labels.items(), key=lambda kv: (-kv[1], kv[0]))
            view.n_labeled = sum(s.labels.values())
        views.append(view)
    _fill_examples(views, stats, image_loader, top_images)

    # A stray NaN/inf row must not cost the run its report: t-SNE rejects non-finite input.
    points = summary.sample
    vectors = np.asarray([p.vector for p in points], dtype=np.float32).reshape(len(points), -1)
    emap = embedding_map(np.nan_to_num(vectors, posinf=0.0, neginf=0.0), seed=summary.limits.seed,
                         max_points=max(1, len(points)))
    map_clusters = np.asarray([points[i].cluster for i in emap.index], dtype=np.int64)
    size_ids, size_values = order, [stats[c].n for c in order]
    map_png = figures.map_png(emap.xy, map_clusters, colors)
    sizes_png = figures.sizes_png(size_ids, size_values, colors)

    label_colors = {}
    if any_labels:
        names = sorted({v for s in stats.values() for v in s.labels})
        label_colors = dict(zip(names, figures.palette(len(names))))

    page = _render(
        title=title, n=n, k=len(order), metrics=metrics, views=views, label_colors=label_colors,
        n_image=sum(s.n_image for s in stats.values()), n_text=sum(s.n_text for s in stats.values()),
        mean_conf=sum(s.confidence_sum for s in stats.values()) / n,
        map_uri=_data_uri(map_png), sizes_uri=_data_uri(sizes_png),
        map_note=f"{emap.method} of the {vectors.shape[1]}-d clustering space; "
                 + (f"all {n:,} items" if len(points) == n
                    else f"a uniform sample (keyed hash of the id) of {len(points):,} of {n:,} items"),
        images_loaded=image_loader is not None, drift_html=_drift_section(drift) if drift else "",
    )
    subtitle = " · ".join([f"{n:,} items", f"{len(order)} clusters"]
                          + [f"{label} {float(metrics[key]):.3f}" for key, label, _ in METRIC_LABELS
                             if _is_number(metrics.get(key))])
    summary_png = figures.summary_png(title, emap.xy, map_clusters, size_ids, size_values, colors, subtitle)
    rundir.write_bytes("report/summary.png", summary_png)
    rundir.write_bytes("report/index.html", page.encode("utf-8"))
    return rundir.path("report", "index.html")


def _fill_examples(views: list[ClusterView], stats: dict[int, ClusterSummary], image_loader: ImageLoader | None,
                   top_images: int) -> None:
    """Pick each cluster's most confident items; load and shrink their images in one loader call."""
    wanted: list[tuple[ClusterView, Example]] = []
    ranked: dict[int, list[Example]] = {}
    for view in views:
        s = stats[view.cid]
        ranked[view.cid] = sorted(s.with_image + s.without_image, key=Example.rank)
        with_img = s.with_image if image_loader is not None else []
        without = s.without_image if image_loader is not None else ranked[view.cid]
        view.n_text_only = s.n - s.n_image if image_loader is not None else s.n
        wanted += [(view, e) for e in with_img[:top_images]]
        # A cluster without pictures shows its captions; a mixed one lists a few text-only items.
        limit = top_images if not with_img else MIXED_TEXT_ITEMS
        view.texts = _distinct_texts([e for e in without if e.has_text or e.caption], limit)

    if not wanted:
        return
    blobs = image_loader([(e.source, e.row) for _, e in wanted])
    if len(blobs) != len(wanted):
        raise ValueError(f"image_loader returned {len(blobs)} images for {len(wanted)} requests")
    for (view, e), blob in zip(wanted, blobs):
        uri = thumbnail(blob, THUMB_PX)
        if uri is not None:
            view.images.append((uri, e.caption, _title(e)))
    for view in {id(v): v for v, _ in wanted}.values():
        if not view.images:  # every image failed to load (file moved?): fall back to its captions
            view.images_failed = True
            view.texts = _distinct_texts([e for e in ranked[view.cid] if e.caption], top_images)


def _distinct_texts(examples: list[Example], limit: int) -> list[tuple[str, str, int]]:
    """Up to ``limit`` distinct captions from ``examples`` (best first), each with how often it occurs
    among them: a list of "A flower." six times says less than "A flower. ×6"."""
    seen: set[str] = set()
    out: list[tuple[str, str, int]] = []
    counts = Counter(" ".join(e.caption.split()).lower() for e in examples)
    for e in examples:
        key = " ".join(e.caption.split()).lower()
        if key in seen:
            continue
        seen.add(key)
        out.append((e.caption, _title(e), counts[key]))
        if len(out) == limit:
            break
    return out


def _title(e: Example) -> str:
    parts = [e.caption or "(no caption)", f"id: {e.id}", f"confidence: {e.confidence:.3f}"]
    if e.note:
        parts.append(f"note: {e.note}")
    return "\n".join(parts)


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
.drift { margin:20px 0; } table.drift { border-collapse:collapse; font-size:13px; }
table.drift td, table.drift th { padding:2px 10px; text-align:right; border-bottom:1px solid #eee; }
:root { --bg:#f4f5f7; --card:#ffffff; --ink:#1f2933; --muted:#66727f; --line:#e3e6ea; --soft:#f8f9fb;
        --accent:#3d5a98; }
* { box-sizing:border-box; }
html { scroll-behavior:smooth; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Noto Sans","DejaVu Sans",Arial,sans-serif;
       -webkit-font-smoothing:antialiased; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
.wrap { max-width:1280px; margin:0 auto; padding:0 28px; }
header.top { background:var(--card); border-bottom:1px solid var(--line); padding:30px 0 26px; }
.eyebrow { font-size:12px; font-weight:600; letter-spacing:.09em; text-transform:uppercase; color:var(--muted); }
h1 { font-size:30px; line-height:1.2; margin:4px 0 6px; letter-spacing:-.015em; }
.lede { color:var(--muted); margin:0 0 20px; }
.tiles { display:flex; flex-wrap:wrap; gap:10px 28px; }
.tile-group { display:flex; flex-wrap:wrap; gap:8px; }
.tile { background:var(--soft); border:1px solid var(--line); border-radius:12px; padding:8px 14px; min-width:86px; }
.tile .v { font-size:21px; font-weight:650; font-variant-numeric:tabular-nums; }
.tile .k { font-size:11.5px; font-weight:600; letter-spacing:.07em; text-transform:uppercase; color:var(--muted); }
.tile.metric { background:#eef2fa; border-color:#d9e1f2; }
main.wrap { padding-top:26px; padding-bottom:40px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:16px; padding:22px 24px;
        box-shadow:0 1px 2px rgba(16,24,40,.04), 0 4px 14px rgba(16,24,40,.03); }
.overview { display:grid; grid-template-columns:minmax(0,1.15fr) minmax(0,1fr); gap:20px; align-items:start; }
.overview img.fig { width:100%; height:auto; display:block; }
.side { display:flex; flex-direction:column; gap:20px; }
h2 { font-size:18px; margin:0 0 4px; letter-spacing:-.005em; }
.note { color:var(--muted); font-size:13px; margin:6px 0 0; }
.index { display:flex; flex-wrap:wrap; gap:8px; margin-top:12px; }
.chip-link { display:inline-flex; align-items:center; gap:7px; padding:4px 11px 4px 8px; border-radius:999px;
             background:var(--soft); border:1px solid var(--line); color:var(--ink); font-size:13px; }
.chip-link:hover { border-color:#c5ccd6; text-decoration:none; }
.chip-link small { color:var(--muted); font-variant-numeric:tabular-nums; }
.dot { width:11px; height:11px; border-radius:50%; flex:none; display:inline-block; }
h2.section { margin:34px 0 14px; font-size:20px; }
.clusters { display:flex; flex-direction:column; gap:20px; }
section.cluster { border-top:5px solid var(--c); scroll-margin-top:12px; }
.chead { display:flex; flex-wrap:wrap; align-items:baseline; gap:6px 16px; }
.chead h3 { font-size:21px; margin:0; letter-spacing:-.01em; }
.chead .meta { color:var(--muted); font-size:14px; font-variant-numeric:tabular-nums; }
.chead .meta b { color:var(--ink); font-weight:600; }
.chead .up { margin-left:auto; font-size:13px; }
.facts { display:grid; grid-template-columns:minmax(0,1.3fr) minmax(0,1fr); gap:14px 28px; margin:14px 0 18px; }
.facts.single { grid-template-columns:minmax(0,1fr); }
.facts h4 { font-size:11.5px; font-weight:600; letter-spacing:.07em; text-transform:uppercase; color:var(--muted); margin:0 0 7px; }
.terms { display:flex; flex-wrap:wrap; gap:6px; }
.term { background:var(--soft); border:1px solid var(--line); border-radius:7px; padding:2px 9px; font-size:14px; }
.term:first-child { font-weight:600; }
.empty { color:var(--muted); font-style:italic; font-size:14px; }
.bar { display:flex; height:10px; border-radius:5px; overflow:hidden; background:var(--line); margin:2px 0 8px; }
.bar span { display:block; height:100%; }
.legend { display:flex; flex-wrap:wrap; gap:4px 14px; font-size:13.5px; }
.legend span { display:inline-flex; align-items:center; gap:6px; }
.legend .n { color:var(--muted); font-variant-numeric:tabular-nums; }
.major { font-size:13.5px; color:var(--muted); margin-bottom:6px; }
.major b { color:var(--ink); }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(160px,1fr)); gap:16px 14px; }
figure { margin:0; }
.thumb { aspect-ratio:1/1; display:flex; align-items:center; justify-content:center; background:var(--soft);
         border:1px solid var(--line); border-radius:10px; padding:6px; }
.thumb img { max-width:100%; max-height:100%; display:block; border-radius:3px; }
figcaption { font-size:12.5px; line-height:1.35; margin-top:6px; color:var(--ink);
             display:-webkit-box; -webkit-line-clamp:2; -webkit-box-orient:vertical; overflow:hidden; }
ul.texts { margin:0; padding:0; list-style:none; columns:2 340px; column-gap:28px; }
ul.texts li { break-inside:avoid; padding:6px 0 6px 12px; border-left:3px solid var(--line); margin-bottom:6px; font-size:14px; }
ul.texts .times { color:var(--muted); font-size:12.5px; font-variant-numeric:tabular-nums; margin-left:4px; }
.sub { margin:16px 0 8px; font-size:13px; color:var(--muted); }
footer { color:var(--muted); font-size:13px; padding:8px 0 40px; }
@media (max-width:900px) { .overview, .facts { grid-template-columns:minmax(0,1fr); } h1 { font-size:25px; } }
"""


def _tiles(n: int, k: int, n_image: int, n_text: int, mean_conf: float, metrics: dict) -> str:
    tiles = [("items", f"{n:,}", ""), ("clusters", f"{k}", ""), ("with image", f"{n_image:,}", ""),
             ("with caption", f"{n_text:,}", ""), ("mean confidence", f"{mean_conf:.2f}", "")]
    facts = "".join(f'<div class="tile"><div class="v">{v}</div><div class="k">{_esc(lbl)}</div></div>'
                    for lbl, v, _ in tiles)
    scores = "".join(
        f'<div class="tile metric" title="{_esc(meaning)}"><div class="v">{float(metrics[key]):.3f}</div>'
        f'<div class="k">{_esc(label)}</div></div>'
        for key, label, meaning in METRIC_LABELS if _is_number(metrics.get(key)))
    groups = f'<div class="tile-group">{facts}</div>' + (f'<div class="tile-group">{scores}</div>' if scores else "")
    return f'<div class="tiles">{groups}</div>'


def _labels_block(view: ClusterView, label_colors: dict[str, str]) -> str:
    if not view.n_labeled:
        return '<div><h4>Labels</h4><div class="empty">no labelled items</div></div>'
    top, top_n = view.labels[0]
    segments, legend = [], []
    for name, count in view.labels[:3]:
        width = 100.0 * count / view.n_labeled
        segments.append(f'<span style="width:{width:.2f}%;background:{label_colors[name]}" '
                        f'title="{_esc(name)}: {count}"></span>')
        legend.append(f'<span><i class="dot" style="background:{label_colors[name]}"></i>{_esc(name)}'
                      f' <span class="n">{count}</span></span>')
    rest = view.n_labeled - sum(c for _, c in view.labels[:3])
    if rest:
        legend.append(f'<span><i class="dot" style="background:#cfd5dc"></i>{len(view.labels) - 3} other'
                      f' <span class="n">{rest}</span></span>')
    purity = top_n / view.n_labeled
    return (f'<div class="labels-block"><h4>Labels</h4>'
            f'<div class="major">purity <b>{purity:.0%}</b> · majority <b>{_esc(top)}</b>'
            f' ({top_n} of {view.n_labeled} labelled)</div>'
            f'<div class="bar">{"".join(segments)}</div><div class="legend">{"".join(legend)}</div></div>')


def _cluster_card(view: ClusterView, label_colors: dict[str, str], images_loaded: bool) -> str:
    terms = ("".join(f'<span class="term" title="c-TF-IDF {w:.3f}">{_esc(t)}</span>' for t, w in view.terms)
             or '<span class="empty">no caption terms</span>')
    facts = f'<div><h4>Top terms</h4><div class="terms">{terms}</div></div>'
    if label_colors:
        facts += _labels_block(view, label_colors)
    body = []
    if view.images:
        body.append('<div class="grid">' + "".join(
            f'<figure><div class="thumb"><img src="{uri}" alt="{_esc(_cut(cap, 120))}" loading="lazy"></div>'
            f'<figcaption title="{_esc(title)}">{_esc(_cut(cap, CAPTION_CHARS)) or "<i>no caption</i>"}</figcaption></figure>'
            for uri, cap, title in view.images) + "</div>")
    if view.texts:
        if view.images:
            body.append(f'<div class="sub">{view.n_text_only} item{"s" if view.n_text_only != 1 else ""}'
                        f' without an image{", most confident:" if view.n_text_only else ""}</div>')
        elif view.images_failed:
            body.append('<div class="sub">Its images could not be loaded: its most confident captions</div>')
        elif images_loaded:
            body.append('<div class="sub">Text-only cluster: its most confident captions</div>')
        else:
            body.append('<div class="sub">Most confident captions</div>')
        body.append('<ul class="texts">' + "".join(
            f'<li title="{_esc(title)}">{_esc(_cut(cap, LIST_CHARS)) or "<i>no caption</i>"}'
            + (f' <span class="times">×{count}</span>' if count > 1 else "") + "</li>"
            for cap, title, count in view.texts) + "</ul>")
    if not body:
        body.append('<div class="empty">no images or captions to show</div>')
    return (f'<section class="cluster card" id="cluster-{view.cid}" data-cluster="{view.cid}" data-size="{view.size}"'
            f' style="--c:{view.color}">'
            f'<div class="chead"><h3>Cluster {view.cid}</h3>'
            f'<span class="meta"><b>{view.size:,}</b> items · <b>{view.share:.1%}</b> of all'
            f' · mean confidence <b>{view.confidence:.2f}</b></span>'
            f'<a class="up" href="#top">↑ overview</a></div>'
            f'<div class="facts{"" if label_colors else " single"}">{facts}</div>{"".join(body)}</section>')


def _drift_section(d: dict) -> str:
    """What changed since the previous run of the lineage (drift.json), as one card."""
    items, moved = d["items"], d["moved"]
    facts = (f"{items['previous']:,} items before, {items['current']:,} now: {items['kept']:,} kept, "
             f"{items['added']:,} added, {items['removed']:,} removed. <b>{moved['count']:,}</b> kept items "
             f"({moved['share']:.1%}) changed cluster.")
    events = []
    for key, words in (("clusters_born", "born"), ("clusters_vanished", "vanished")):
        if d[key]:
            events.append(f"Clusters {words}: {', '.join(str(c) for c in d[key])}.")
    events += [f"Cluster {s['cluster']} split into {', '.join(str(c) for c in s['into'])}." for s in d["split"]]
    events += [f"Cluster {m['cluster']} merged from {', '.join(str(c) for c in m['from'])}." for m in d["merged"]]
    rows = "".join(f"<tr><td>{c['cluster']}</td><td>{c['previous_size']:,}</td><td>{c['size']:,}</td>"
                   f"<td>{c['change']:+,}</td><td>{c['new_share']:.1%}</td></tr>" for c in d["clusters"])
    examples = "".join(f"<li>{_esc(e['id'])}: {e['previous']} → {e['current']}</li>" for e in moved["examples"])
    return (f'<div class="card drift"><h2>Since the previous run</h2><p>{facts}</p>'
            f'<p class="note">Previous run: {_esc(d.get("previous_run", ""))}. Cluster ids are stable across runs '
            f'(matched by shared items); new ids are never reused.</p>'
            + "".join(f"<p>{_esc(e)}</p>" for e in events)
            + f'<table class="drift"><tr><th>cluster</th><th>before</th><th>now</th><th>change</th>'
              f'<th>new items</th></tr>{rows}</table>'
            + (f'<p class="note">Items that changed cluster (first {len(moved["examples"])}):</p><ul>{examples}</ul>'
               if examples else "") + "</div>")


def _render(*, title: str, n: int, k: int, metrics: dict, views: Sequence[ClusterView], label_colors: dict[str, str],
            n_image: int, n_text: int, mean_conf: float, map_uri: str, sizes_uri: str, map_note: str,
            images_loaded: bool, drift_html: str = "") -> str:
    try:
        import importlib.metadata

        version = importlib.metadata.version("raymmc")
    except Exception:  # not installed (e.g. run from a source tree)
        version = ""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_labeled = metrics.get("n_labeled")
    labeled_note = (f" Metrics are computed on the {n_labeled:,} labelled items."
                    if isinstance(n_labeled, int) and any(key in metrics for key, _, _ in METRIC_LABELS) else "")
    index = "".join(
        f'<a class="chip-link" href="#cluster-{v.cid}"><i class="dot" style="background:{v.color}"></i>'
        f'{v.cid} <small>{v.size:,}</small></a>' for v in views)
    cards = "".join(_cluster_card(v, label_colors, images_loaded) for v in views)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)} · cluster report</title>
<style>{CSS}</style></head>
<body id="top">
<header class="top"><div class="wrap">
<div class="eyebrow">raymmc cluster report</div>
<h1>{_esc(title)}</h1>
<p class="lede">{n:,} items in {k} clusters.{labeled_note}</p>
{_tiles(n, k, n_image, n_text, mean_conf, metrics)}
</div></header>
<main class="wrap">
<div class="overview">
<div class="card"><h2>Embedding map</h2>
<img class="fig" src="{map_uri}" alt="2-D map of the items coloured by cluster">
<p class="note">{_esc(map_note)}. Numbers mark each cluster's median position.</p></div>
<div class="side">
<div class="card"><h2>Cluster sizes</h2>
<img class="fig" src="{sizes_uri}" alt="bar chart of cluster sizes">
</div>
<div class="card"><h2>Clusters</h2>
<p class="note">Largest first. Each card lists the cluster's top caption terms (c-TF-IDF){
    ", its label mix" if label_colors else ""} and its most confident items; hover a caption for its full text.</p>
<div class="index">{index}</div></div>
</div></div>
{drift_html}<h2 class="section">Clusters, largest first</h2>
<div class="clusters">{cards}</div>
</main>
<footer class="wrap">Generated by raymmc{" " + _esc(version) if version else ""} on {now}.
Top terms: class-based TF-IDF over each cluster's cleaned captions (English stop words removed).
Images: the cluster's most confident items, shrunk to {THUMB_PX} px.</footer>
</body></html>
"""
