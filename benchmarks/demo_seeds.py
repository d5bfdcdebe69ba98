"""`raymmc run` on the demo archive over several seeds: ACC/NMI/ARI as mean ± std.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 5 [--algorithm kmeans] [--set key=value ...]

Each seed is a full `raymmc run` (same Ray session); features come from the feature cache after
the first seed when the encoders do not depend on the seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYMMC_PROGRESS", "0")

from raymmc.config import load_config  # noqa: E402
from raymmc.pipeline import run  # noqa: E402
from raymmc.report.metrics import format_mean_std  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--algorithm", default="kmeans")
    p.add_argument("--input", default=None, help="archive URI (default: the demo)")
    p.add_argument("--clusters", type=int, default=11)
    p.add_argument("--output", default=None, help="where runs go (default: a temporary directory)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="raymmc-seeds-")
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        shutil.rmtree(os.path.join(output, f"seed{seed}"), ignore_errors=True)  # an earlier invocation's run
        cfg = load_config(overrides=args.overrides, values={
            "input": args.input, "output": output, "run_name": f"seed{seed}", "seed": seed, "report": False,
            "cluster": {"algorithm": args.algorithm, "clusters": args.clusters}})
        m = run(cfg, log=lambda _: None).metrics
        rows.append(m)
        print(f"seed {seed}: acc={m['acc']:.3f} nmi={m['nmi']:.3f} ari={m['ari']:.3f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"\n{args.algorithm}, {args.seeds} seeds, mean ± std (population), runs in {output}")
    print("| ACC | NMI | ARI | purity | F |\n|---|---|---|---|---|")
    print("| " + " | ".join(format_mean_std([r[k] for r in rows]) for k in ("acc", "nmi", "ari", "purity", "f_score"))
          + " |")


if __name__ == "__main__":
    main()
