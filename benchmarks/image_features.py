"""Variants of the MobileNetV2 image features that need no new weights (issue 13, an experiment; docs/results.md).

For each archive: the images are decoded from its shards and encoded again as the run does (centre crop, average
pool: "crop") and as variants -- no centre crop ("nocrop"), horizontal-flip averaging, signed square root, GeM
(p = 3) and max pooling, and the pooled outputs of blocks 13 and 16 beside the last one, each L2-normalised
("multi"). The caption features are the run's. Printed per variant, 5 seeds, mean ± std: NMI of image k-means
and of concatenated k-means against the labels, and the label-free agreement (NMI between image k-means and
caption k-means).

    python benchmarks/image_features.py --run <tuxpaint run> --shards <tuxpaint shards> --seeds 5
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.cluster.registry import make_clusterer  # noqa: E402
from raymmc.features.decode import DecodeConfig, decode_image  # noqa: E402
from raymmc.features.image import IMAGENET_MEAN, IMAGENET_STD, build_image_encoder  # noqa: E402
from raymmc.pipeline import load_run_features  # noqa: E402

TAPS = (13, 16, 18)  # MobileNetV2 block outputs: 96 channels at 14x14, 160 at 7x7, 1280 at 7x7 (the run's)


@torch.inference_mode()
def pooled(trunk: torch.nn.Module, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - mean) / std
    taps = {}
    for i, block in enumerate(trunk):
        x = block(x)
        if i in TAPS:
            taps[i] = x
    last = taps[18]
    return {"avg": last.mean((2, 3)).numpy(), "gem3": last.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy(),
            "max": last.amax((2, 3)).numpy(), "b13": taps[13].mean((2, 3)).numpy(),
            "b16": taps[16].mean((2, 3)).numpy()}


def encode(trunk, blobs: list[bytes], decode: DecodeConfig, flip: bool, batch: int = 64) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(blobs), batch):
        images = [decode_image(b, decode)[0] for b in blobs[start:start + batch]]
        if flip:
            images = [im[:, ::-1].copy() for im in images]
        for k, v in pooled(trunk, images).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def l2(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def variants(trunk, blobs: list[bytes]) -> dict[str, np.ndarray]:
    out = {}
    for name, decode in (("crop", DecodeConfig()), ("nocrop", DecodeConfig(resize=224, image_size=224))):
        f = encode(trunk, blobs, decode, flip=False)
        out[name] = f["avg"]
        out[f"{name}-sqrt"] = np.sqrt(f["avg"])  # ReLU features: the signed square root is the square root
        out[f"{name}-gem3"] = f["gem3"]
        out[f"{name}-max"] = f["max"]
        out[f"{name}-multi"] = np.concatenate([l2(f[k]) for k in ("b13", "b16", "avg")], 1)
        if name == "nocrop":
            out["nocrop-flip"] = (f["avg"] + encode(trunk, blobs, decode, flip=True)["avg"]) / 2
    return out


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="a `raymmc run` directory (repeatable)")
    ap.add_argument("--shards", action="append", required=True, help="its archive's shard folder (same order)")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    model, _ = build_image_encoder("mobilenet_v2", "auto")
    print("| archive | variant | image k-means NMI | image-caption agreement | concatenated k-means NMI |")
    print("|---|---|---|---|---|")
    for run, shards in zip(args.run, args.shards):
        data, labels = load_run_features(run)
        blobs: dict[str, bytes] = {}
        for f in sorted(glob.glob(os.path.join(shards, "*.parquet"))):
            t = pq.read_table(f, columns=["id", "image"])
            blobs.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
        feats = variants(model.features, [blobs[i] for i in data.ids])
        if not np.allclose(feats["crop"], data.image, atol=1e-4):  # "crop" must be the run's own features
            raise SystemExit(f"{run}: re-encoded images differ from the run's features")
        k = len(np.unique(labels))
        for name, image in feats.items():
            d = replace(data, image=image.astype(np.float32))
            r: dict[str, list[float]] = {"img": [], "agree": [], "cat": []}
            for seed in range(args.seeds):
                def fit(view: str) -> np.ndarray:
                    return make_clusterer("kmeans", k, {"view": view}, seed=seed).fit(d).predict(d)
                pi = fit("image")
                r["img"].append(nmi(labels, pi))
                r["agree"].append(nmi(pi, fit("text")))
                r["cat"].append(nmi(labels, fit("concat")))
            cells = " | ".join(f"{np.mean(v):.3f}±{np.std(v):.3f}" for v in r.values())
            print(f"| {Path(run).name} | {name} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
