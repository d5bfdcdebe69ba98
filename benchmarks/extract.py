"""Feature-extraction throughput and memory.

    .venv/bin/python benchmarks/extract.py [--items 1024] [--models mobilenet_v2 resnet50] [--batch 32] [--text none]

For each image model, in one run:
- bare: the model's forward pass alone on already-decoded 224x224 tensors (same batch size, same
  torch threads as one encoder actor), the faster of two passes over N items;
- pipeline: the whole Ray Data job (read Parquet -> decode -> encoder actor -> write the feature
  cache), items / wall seconds; Ray start-up (ray.init and Ray Data's one-time session set-up, done by a
  trivial dataset first) excluded, actor start-up and model loading included (so the ratio grows with N);
- their ratio; where the first feature rows landed (start-up: Ray Data planning, worker and actor
  start, model loading, one batch) and the steady rate after that, from the output files' write times;
- the peak resident memory of the whole job (driver, Ray, workers) for N and 4N items, to show that
  extraction streams.

``--text minilm|doc2vec|tfidf`` adds the text stage (its actors, and for doc2vec/tfidf fitting on the
archive's captions, which happens before the Ray Data job) to the pipeline; bare stays the image forward.

ResNet-50's ImageNet weights cannot be installed offline: where they are absent, it runs with
random weights (identical cost). Each measurement runs in its own process (and Ray cluster) so
that memory figures do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYMMC_PROGRESS", "0")


def make_archive(n: int, out: str, rows_per_shard: int = 64) -> str:
    """n real tuxpaint images (cycled, new ids) as Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymmc import datasets
    from raymmc.io.shards import SCHEMA

    items = datasets.collect("tuxpaint")
    m = len(items.ids)
    idx = [i % m for i in range(n)]
    table = pa.table({"id": [f"{items.ids[i]}#{k}" for k, i in enumerate(idx)],
                      "image": [items.images[i] for i in idx], "caption": [items.captions[i] for i in idx],
                      "label": [items.labels[i] for i in idx]}, schema=SCHEMA)
    os.makedirs(out, exist_ok=True)
    for s in range(0, n, rows_per_shard):
        pq.write_table(table.slice(s, rows_per_shard), os.path.join(out, f"part-{s // rows_per_shard:05d}.parquet"))
    return out


def weights_for(model: str) -> str:
    from raymmc.features.image import resolve_weights

    source = resolve_weights(model, "auto")
    return "random" if source.startswith("http") else "auto"


def bare(model: str, n: int, batch: int, threads: int) -> dict:
    import numpy as np
    import torch

    from raymmc import datasets
    from raymmc.features.decode import DecodeConfig, decode_image
    from raymmc.features.image import ImageEncoder

    torch.set_num_threads(threads)
    items = datasets.collect("tuxpaint")
    cfg = DecodeConfig()
    decoded = [decode_image(items.images[i % len(items.ids)], cfg)[0] for i in range(min(n, len(items.ids)))]
    x = np.stack([decoded[i % len(decoded)] for i in range(n)])
    enc = ImageEncoder(model, weights_for(model), device="cpu")
    enc(x[:batch])  # warm-up
    times = []
    for _ in range(2):  # the faster of two passes: a conservative reference for the ratio
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            enc(x[s:s + batch])
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"items": n, "seconds": dt, "items_per_s": n / dt}


def pipeline(model: str, n: int, batch: int, threads: int, text: str = "none") -> dict:
    from raymmc.config import RayConfig, load_config
    from raymmc.features.extract import run_extraction
    from raymmc.io.shards import discover
    from raymmc.raysession import init_ray

    tmp = tempfile.mkdtemp(prefix="raymmc-bench-")
    archive = make_archive(n, os.path.join(tmp, "in"))
    cfg = load_config(overrides=[f"extract.image.model={model}", f"extract.image.weights={weights_for(model)}",
                                 f"extract.image.batch_size={batch}", "extract.min_actors=1", "extract.max_actors=1",
                                 f"extract.cpus_per_actor={threads}", f"extract.text.model={text}"])
    init_ray(RayConfig(num_cpus=os.cpu_count()))
    import ray

    # Ray Data's one-time set-up in a fresh session (its stats actor, ~3 s here) counts as Ray start-up.
    ray.data.range(1).map_batches(lambda b: b, num_cpus=cfg.extract.cpus_per_task).materialize()
    shards = discover(archive)
    t0 = time.time()
    _, stats = run_extraction(shards, os.path.join(tmp, "cache"), extract_cfg=cfg.extract, seed=0,
                              storage=cfg.storage, has_gpu=False,
                              modalities=frozenset({"image"} if text == "none" else {"image", "text"}),
                              log=lambda _: None)
    dt = time.time() - t0
    assert stats.rows == n
    return {"items": n, "seconds": dt, "items_per_s": n / dt, **output_timeline(stats.cache, t0)}


def output_timeline(cache: str, t0: float) -> dict:
    """From the feature files' write times: seconds until the first rows landed (start-up: Ray Data
    planning, worker and actor start, model loading, the first batch), and the steady rate after that
    (rows written after the first file / time from the first file to the last)."""
    import glob

    files = sorted(glob.glob(os.path.join(cache, "*", "*", "rows-*.parquet")), key=os.path.getmtime)
    rows = [int(b) - int(a) + 1 for a, b in (os.path.basename(f)[5:-8].split("-") for f in files)]
    times = [os.path.getmtime(f) for f in files]
    span = times[-1] - times[0]
    return {"first_output_s": times[0] - t0, "last_output_s": times[-1] - t0,
            "steady_items_per_s": sum(rows[1:]) / span if span > 0 else float("nan")}


def _session_rss_bytes(sid: int) -> int:
    """Resident memory of every process in session ``sid`` (the job, its Ray cluster, its workers)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) != sid:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def measure(kind: str, model: str, n: int, batch: int, threads: int, text: str = "none") -> dict:
    """Run one measurement in its own session; sample its peak memory from outside."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, model, str(n), str(batch), str(threads),
                             text],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _session_rss_bytes(proc.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)  # Ray leftovers
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {model} n={n} failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, model, n, batch, threads, text = (sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                                                int(sys.argv[6]), sys.argv[7])
        result = bare(model, n, batch, threads) if kind == "bare" else pipeline(model, n, batch, threads, text)
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1024, help="N (memory is also measured at 4N)")
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the encoder (= CPUs per actor)")
    p.add_argument("--text", choices=["none", "minilm", "doc2vec", "tfidf"], default="none",
                   help="also run this text encoder in the pipeline (the bare figure stays the image forward alone)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; batch {args.batch}; encoder threads {args.threads}; N = {args.items}; "
          f"text encoder in the pipeline: {args.text}\n")
    print("| model | bare forward (items/s) | pipeline at N (items/s) | pipeline at 4N (items/s) | ratio 4N / bare "
          "| first rows out at 4N (s) | steady rate at 4N (items/s) | steady / bare "
          "| peak RSS N (MB) | peak RSS 4N (MB) | ratio 4N/N |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        b = measure("bare", model, args.items, args.batch, args.threads)
        p1 = measure("pipeline", model, args.items, args.batch, args.threads, args.text)
        p4 = measure("pipeline", model, 4 * args.items, args.batch, args.threads, args.text)
        print(f"| {model} | {b['items_per_s']:.1f} | {p1['items_per_s']:.1f} | {p4['items_per_s']:.1f} | "
              f"{p4['items_per_s'] / b['items_per_s']:.2f} | {p4['first_output_s']:.1f} | "
              f"{p4['steady_items_per_s']:.1f} | {p4['steady_items_per_s'] / b['items_per_s']:.2f} | "
              f"{p1['peak_rss_mb']:.0f} | {p4['peak_rss_mb']:.0f} | "
              f"{p4['peak_rss_mb'] / p1['peak_rss_mb']:.2f} |", flush=True)
    print("\npipeline = whole Ray Data job, actor start-up and model loading included (Ray start-up excluded); "
          "steady = rows written after the first output file / seconds from first to last output file")


if __name__ == "__main__":
    main()
