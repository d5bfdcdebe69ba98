"""The report page of a `raymmc tune` sweep: every trial's label-free score, and where the archive has labels
the score against NMI (how well the score ranked the trials) with Spearman's rho."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np

from raymmc.io.rundir import RunDir


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def spearman(rows: Sequence[dict[str, Any]], x: str = "score", y: str = "nmi") -> tuple[float | None, int]:
    """Spearman's rho of ``x`` against ``y`` over the rows that have both (None below 3 rows, or constant)."""
    from scipy.stats import spearmanr

    pairs = [(r[x], r[y]) for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    if len(pairs) < 3:
        return None, len(pairs)
    a, b = np.array(pairs, dtype=float).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, len(pairs)
    return float(spearmanr(a, b).statistic), len(pairs)


def score_plot_png(rows: Sequence[dict[str, Any]], score_name: str, best_trial: str | None) -> bytes | None:
    """Score (x) against NMI (y), one point per completed trial, the chosen one ringed; None without labels."""
    from matplotlib.figure import Figure

    from raymmc.report.figures import to_png

    pts = [(r["score"], r["nmi"], r["trial_id"]) for r in rows
           if r.get("completed") and _finite(r.get("score")) and _finite(r.get("nmi"))]
    if not pts:
        return None
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.scatter(xs, ys, s=28, color="#4269d0")
    for s, n, t in pts:
        if t == best_trial:
            ax.scatter([s], [n], s=140, facecolors="none", edgecolors="#d62728", linewidths=2, label="chosen")
    rho, n = spearman(rows)
    ax.set_xlabel(f"label-free score ({score_name})")
    ax.set_ylabel("NMI (labels; never used to choose)")
    ax.set_title(f"{n} trials, Spearman rho = {rho:.2f}" if rho is not None else f"{n} trials")
    if best_trial is not None:
        ax.legend(loc="lower right", frameon=False)
    return to_png(fig)


def write_sweep_report(rundir: RunDir, rows: Sequence[dict[str, Any]], best: dict[str, Any] | None,
                       searched: Sequence[str], title: str) -> str:
    """report/index.html of the sweep (and report/score_vs_nmi.png where there are labels); returns its path."""
    import base64

    png = score_plot_png(rows, best["score_name"] if best else "score", best["trial_id"] if best else None)
    cols = ["trial_id", *searched, "clusters", "score", "silhouette", "calinski_harabasz", "agreement",
            "silhouette_agreement", "agreed_silhouette", "stability", "nmi", "acc", "ari", "step", "completed", "error"]
    cols = [c for c in cols if any(c in r and r[c] not in (None, "") for r in rows)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else ""
        return html.escape(str(v)) if v is not None else ""

    body = "".join("<tr{}>{}</tr>".format(' class="best"' if best and r.get("trial_id") == best["trial_id"] else "",
                                          "".join(f"<td>{cell(r.get(c))}</td>" for c in cols)) for r in rows)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if best:
        parts.append(f"<p>Chosen by <b>{html.escape(best['score_name'])}</b> (label-free): trial "
                     f"{html.escape(str(best['trial_id']))}, K = {best['clusters']}, score {best['score']:.4f}. "
                     f"Its run on the whole archive: <code>{html.escape(str(best.get('run') or ''))}</code>.</p>")
    rho, n = spearman(rows)
    if rho is not None:
        parts.append(f"<p>Where the archive has labels: Spearman(score, NMI) = {rho:.3f} over {n} completed "
                     "trials.</p>")
    if png is not None:
        rundir.write_bytes("report/score_vs_nmi.png", png)
        parts.append('<img alt="score against NMI" src="data:image/png;base64,'
                     + base64.b64encode(png).decode("ascii") + '">')
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" + body + "</table>")
    page = ("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}tr.best{background:#fde9b6}</style>"
            + "".join(parts))
    rundir.write_bytes("report/index.html", page.encode("utf-8"))
    return rundir.path("report/index.html")
