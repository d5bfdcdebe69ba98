"""The report's matplotlib figures: the embedding map, the cluster-size chart and the summary.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot: no global
figure state, no GUI backend, safe inside Ray workers and threads.
"""

from __future__ import annotations

import colorsys
import io
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

INK = "#1f2933"
MUTED = "#6b7785"
GRID = "#e4e7eb"

# Tableau 10, then 10 more picked to stay apart from it (Tableau 20 pairs dark/light shades of
# the same hue, which reads as "related clusters"); beyond 20, hues spread by the golden ratio.
# Greys come last: in a label bar grey reads as "other".
_BASE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
         "#9c755f", "#2f4b7c", "#7a8b1a", "#d45087", "#2a9d8f", "#8b1e1e", "#665191", "#56b4e9",
         "#b8860b", "#a05195", "#5c6b7a", "#bab0ac"]


def palette(k: int) -> list[str]:
    """``k`` distinguishable hex colours."""
    if k <= len(_BASE):
        return _BASE[:k]
    out = list(_BASE)
    for i in range(k - len(_BASE)):
        h = (i * 0.618033988749895) % 1.0
        light = (0.45, 0.6, 0.35)[i % 3]  # vary lightness too, so neighbours in hue still differ
        r, g, b = colorsys.hls_to_rgb(h, light, 0.65)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def to_png(fig: Figure, dpi: int = 144) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.08)
    return buf.getvalue()


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=8, length=0)


def draw_map(ax, xy: np.ndarray, clusters: np.ndarray, colors: dict[int, str], *, annotate: bool = True) -> None:
    """Scatter ``xy`` coloured by cluster, each cluster's id at the median of its points."""
    n = len(xy)
    size = float(np.clip(9000 / max(n, 1), 3, 36))  # fewer points -> bigger dots
    if n:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=[colors[int(c)] for c in clusters], alpha=0.75,
                   linewidths=0, rasterized=True)
    if annotate:
        present = sorted(set(int(c) for c in clusters))
        fontsize = 9 if len(present) <= 20 else 7
        for c in present:
            at = np.median(xy[clusters == c], axis=0)  # median: robust to a cluster's stray points
            ax.text(at[0], at[1], str(c), ha="center", va="center", fontsize=fontsize, fontweight="bold",
                    color=INK, bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=colors[c], lw=1.2, alpha=0.9))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.margins(0.03)  # no equal aspect: t-SNE axes carry no scale, and filling the panel reads better


def draw_sizes(ax, ids: Sequence[int], sizes: Sequence[int], colors: dict[int, str]) -> None:
    """Vertical bars of cluster sizes in the given order (largest first), labelled by cluster id."""
    pos = np.arange(len(ids))
    ax.bar(pos, sizes, color=[colors[int(c)] for c in ids], width=0.78)
    # Keep tick labels legible for many clusters: upright up to 20, then rotated, then thinned.
    step = max(1, int(np.ceil(len(ids) / 60)))
    ax.set_xticks(pos[::step])
    ax.set_xticklabels([str(c) for c in ids][::step], rotation=0 if len(ids) <= 20 else 90,
                       fontsize=8 if len(ids) <= 20 else 6.5)
    ax.set_xlim(-0.6, len(ids) - 0.4)
    ax.set_xlabel("cluster (largest first)", color=MUTED, fontsize=8)
    ax.set_ylabel("items", color=MUTED, fontsize=8)
    ax.yaxis.grid(True, color=GRID, lw=0.8)
    ax.set_axisbelow(True)
    _style(ax)
    if len(ids) <= 30:
        top = max(sizes) if len(sizes) else 0
        for p, s in zip(pos, sizes):
            ax.text(p, s + top * 0.01, str(s), ha="center", va="bottom", fontsize=7, color=MUTED)


def map_png(xy: np.ndarray, clusters: np.ndarray, colors: dict[int, str]) -> bytes:
    fig = Figure(figsize=(6.2, 4.9))
    draw_map(fig.add_subplot(1, 1, 1), xy, clusters, colors)
    return to_png(fig)


def sizes_png(ids: Sequence[int], sizes: Sequence[int], colors: dict[int, str]) -> bytes:
    fig = Figure(figsize=(5.6, 2.7))
    draw_sizes(fig.add_subplot(1, 1, 1), ids, sizes, colors)
    return to_png(fig)


def summary_png(title: str, xy: np.ndarray, clusters: np.ndarray, ids: Sequence[int], sizes: Sequence[int],
                colors: dict[int, str], subtitle: str = "") -> bytes:
    """The quick-look figure: the map and the size chart side by side."""
    fig = Figure(figsize=(13, 5.6))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.1, 1.0], wspace=0.12, top=0.82, bottom=0.08, left=0.03, right=0.98)
    ax_map = fig.add_subplot(grid[0, 0])
    draw_map(ax_map, xy, clusters, colors)
    ax_map.set_title("embedding map", color=INK, fontsize=10, loc="left")
    ax_sizes = fig.add_subplot(grid[0, 1])
    draw_sizes(ax_sizes, ids, sizes, colors)
    ax_sizes.set_title("cluster sizes", color=INK, fontsize=10, loc="left")
    # Plain text: a "$" in a run title would otherwise start matplotlib mathtext.
    fig.text(0.03, 0.975, title.replace("$", r"\$"), ha="left", va="top", fontsize=14, fontweight="bold", color=INK)
    if subtitle:
        fig.text(0.03, 0.915, subtitle.replace("$", r"\$"), ha="left", va="top", fontsize=10, color=MUTED)
    return to_png(fig, dpi=110)
