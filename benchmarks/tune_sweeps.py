"""`raymmc tune` on the dev archives: does the label-free choice pick good trials, and the right K?

Runs (or, with --summarize, only reads) one sweep per archive and prints, per sweep: trials completed / stopped by
ASHA, Spearman(score, NMI) over the completed trials, the chosen trial's NMI and its rank, the best NMI of the
sweep, the chosen K against the number of classes, and whether the winner's run on the whole archive reproduced
the trial's score. Labels are only read for this table; the sweep never sees them.

    python benchmarks/tune_sweeps.py --input tuxpaint=/path/shards/tuxpaint --input oxygen=/path/oxygen \\
        --clusters 11 --clusters 10 --output /tmp/sweeps --trials 12 [--set tune.max_concurrent=2 ...]
    python benchmarks/tune_sweeps.py --summarize /tmp/sweeps/tux-k11 /tmp/sweeps/oxy-k10
    python benchmarks/tune_sweeps.py --summarize /tmp/sweeps/* --floors 0.3 0.4 0.5 0.6 0.7 0.8

--floors re-scores each sweep's completed trials post hoc by ``agreed_silhouette`` at each agreement floor (from
their ``silhouette`` and ``agreement`` columns) and prints the NMI of the trial each floor would choose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def summarize(sweep: Path) -> dict:
    import csv

    rows = list(csv.DictReader((sweep / "trials.csv").open()))
    manifest = json.loads((sweep / "manifest.json").read_text())
    best = manifest["best"] or {}
    done = [r for r in rows if r["completed"] == "True" and r["nmi"]]
    nmis = sorted((float(r["nmi"]) for r in done), reverse=True)
    labels = set()
    feats = json.loads((sweep / "features.json").read_text())["dirs"]
    import pyarrow.parquet as pq

    for d in feats:
        for f in Path(d).glob("*.parquet"):
            t = pq.read_table(f, columns=["label"])
            labels |= {v for v in t.column("label").to_pylist() if v is not None}
    s = manifest["summary"]
    return {
        "sweep": sweep.name, "trials": s["trials"], "completed": s["completed"], "stopped": s["stopped_early"],
        "spearman": s["spearman_score_nmi"], "chosen_nmi": best.get("trial_metrics", {}).get("nmi"),
        "rank": best.get("nmi_rank"), "of": len(done), "best_nmi": nmis[0] if nmis else None,
        "median_nmi": float(np.median(nmis)) if nmis else None, "k": best.get("clusters"), "classes": len(labels),
        "score": best.get("score"), "run_score": best.get("run_score"),
        "range": manifest["search"]["clusters"], "seconds": manifest["stage_seconds"].get("trials"),
    }


def floor_picks(sweep: Path, floors: list[float]) -> list[float]:
    """The NMI of the completed trial ``agreed_silhouette`` at each floor ranks first (post hoc)."""
    import csv

    from raymmc.cluster.selection import agreed_silhouette

    rows = [r for r in csv.DictReader((sweep / "trials.csv").open())
            if r["completed"] == "True" and r["nmi"] and r.get("agreement")]
    return [float(max(rows, key=lambda r: agreed_silhouette(float(r["silhouette"]), float(r["agreement"]), f))["nmi"])
            for f in floors]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarize", nargs="*", help="sweep directories to read (no sweep is run)")
    ap.add_argument("--input", action="append", default=[], help="NAME=URI of an archive (repeatable)")
    ap.add_argument("--clusters", action="append", default=[], help="K or LO:HI, one per --input")
    ap.add_argument("--output", default="runs/sweeps")
    ap.add_argument("--algorithm", default="jecl")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--floors", nargs="*", type=float, default=[],
                    help="also print the trial agreed_silhouette would choose at each agreement floor (post hoc)")
    args = ap.parse_args(argv)
    dirs = [Path(p) for p in args.summarize or []]
    for spec, k in zip(args.input, args.clusters):
        name, uri = spec.split("=", 1)
        run_name = f"{name}-{args.algorithm}-k{k.replace(':', '-')}"
        if (Path(args.output) / run_name).exists():  # this benchmark's own earlier sweep: a run folder is one run's
            print(f"replacing {Path(args.output) / run_name}", flush=True)
            shutil.rmtree(Path(args.output) / run_name)
        cmd = [sys.executable, "-m", "raymmc.cli", "tune", "--input", uri, "--output", args.output, "--run-name",
               run_name, "--algorithm", args.algorithm, "--clusters", k, "--trials", str(args.trials),
               *sum((["--set", o] for o in args.overrides), [])]
        subprocess.run(cmd, check=True, cwd=REPO)
        dirs.append(Path(args.output) / run_name)
    print("| sweep | K range | trials (done / stopped) | Spearman(score, NMI) | chosen NMI (rank) | best / median NMI "
          "| K chosen / classes | winner's run reproduces the score | trials s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        r = summarize(d)
        same = r["score"] is not None and r["run_score"] is not None and abs(r["score"] - r["run_score"]) < 1e-6
        repro = "yes" if same else f"{r['run_score']:.4f} vs {r['score']:.4f}"
        print(f"| {r['sweep']} | {r['range'][0]}..{r['range'][1]} | {r['trials']} ({r['completed']} / {r['stopped']}) "
              f"| {r['spearman']:.3f} | {r['chosen_nmi']:.3f} ({r['rank']} of {r['of']}) | {r['best_nmi']:.3f} / "
              f"{r['median_nmi']:.3f} | {r['k']} / {r['classes']} | {repro} "
              f"| {r['seconds']:.0f} |")
    if args.floors:
        print("\n| sweep | " + " | ".join(f"chosen NMI at floor {f:g}" for f in args.floors) + " |")
        print("|---|" + "---|" * len(args.floors))
        for d in dirs:
            print(f"| {d.name} | " + " | ".join(f"{v:.3f}" for v in floor_picks(d, args.floors)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
