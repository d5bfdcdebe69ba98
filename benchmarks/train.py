"""Training cost per epoch for N, 2N and 4N items: does it scale linearly?

    .venv/bin/python benchmarks/train.py [--items 2000] [--algorithm jecl] [--workers 1]

Synthetic paired features of the demo's shape (1280-d image, 384-d text, 11 clusters). For each
size, JECL (or DEC) is fitted with a fixed number of autoencoder epochs and self-training steps
per epoch-equivalent; the seconds per autoencoder-pretraining epoch are read off the progress
callback (mean over epochs, the first left out as warm-up). ``--workers N`` runs the same fit
under Ray Train's TorchTrainer with N workers instead of in-process. Where CUDA is present the
in-process fit is also timed on the GPU and steps/s are compared.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAYMMC_PROGRESS", "0")


def synthetic(n: int, seed: int = 0):
    from raymmc.cluster.base import MultiViewData

    rng = np.random.default_rng(seed)
    k = 11
    y = rng.integers(0, k, n)
    img = (rng.normal(size=(k, 1280))[y] * 2 + rng.normal(size=(n, 1280))).astype(np.float32)
    txt = (rng.normal(size=(k, 384))[y] * 2 + rng.normal(size=(n, 384))).astype(np.float32)
    return MultiViewData(image=img, text=txt), y


def epoch_seconds(algorithm: str, n: int, epochs: int, device: str) -> float:
    from raymmc.cluster.registry import make_clusterer

    data, _ = synthetic(n)
    stamps: dict[str, list[float]] = {}

    def on_epoch(info: dict) -> None:
        phase = str(info.get("phase", ""))
        if phase == "pretrain":  # one series per view (JECL pretrains two autoencoders)
            stamps.setdefault(f"pretrain_{info.get('view', '')}", []).append(time.perf_counter())

    ae = {"epochs": epochs}
    params = {"image_ae": ae, "text_ae": ae, "device": device, "cluster": {"max_iter": 1}} if algorithm == "jecl" \
        else {"ae": ae, "device": device, "cluster": {"max_iter": 1}, "view": "image"}
    make_clusterer(algorithm, 11, params, seed=0, on_epoch=on_epoch).fit(data)
    # Seconds between consecutive epochs of one phase (the first gap left out as warm-up),
    # summed over phases: for JECL one epoch = both views' autoencoders.
    return float(sum(np.diff(t)[1:].mean() for t in stamps.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--algorithm", default="jecl", choices=["jecl", "dec"])
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    import torch

    print(f"{args.algorithm}: seconds per autoencoder epoch (both views for JECL), torch threads "
          f"{torch.get_num_threads()}\n")
    print("| items | CPU s/epoch | ratio to N |" + (" GPU s/epoch | GPU speed-up |" if torch.cuda.is_available() else ""))
    print("|---|---|---|" + ("---|---|" if torch.cuda.is_available() else ""))
    base = None
    for mult in (1, 2, 4):
        n = args.items * mult
        cpu = epoch_seconds(args.algorithm, n, args.epochs, "cpu")
        base = base or cpu
        row = f"| {n} | {cpu:.3f} | {cpu / base:.2f} |"
        if torch.cuda.is_available():
            gpu = epoch_seconds(args.algorithm, n, args.epochs, "cuda")
            row += f" {gpu:.3f} | {cpu / gpu:.1f}x |"
        print(row, flush=True)
    print("\nlinear scaling: the 4N ratio should be about 4 (acceptance: <= 4.4)")


if __name__ == "__main__":
    main()
