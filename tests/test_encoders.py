"""Real encoders: ImageNet MobileNetV2 from the offline package, MiniLM, Doc2Vec, TF-IDF."""

import numpy as np
import pytest
import torch
import torchvision

from raymmc.features.decode import DecodeConfig, decode_image
from raymmc.features.image import ImageEncoder, WeightsError, build_image_encoder, resolve_weights
from raymmc.features.text import (Doc2VecConfig, Doc2VecEncoder, MiniLMEncoder, TextEncoderConfig, TfidfConfig,
                                  TfidfSvdEncoder, make_text_encoder)


@pytest.fixture(scope="module")
def mobilenet():
    return ImageEncoder("mobilenet_v2", device="cpu")


def test_mobilenet_uses_real_imagenet_weights(mobilenet, tux_items):
    assert mobilenet.weights_source.endswith("mobilenet_v2-b0353104.pth")
    # The full ImageNet classifier recognises a real tuxpaint stamp better than chance: the
    # weights are the trained ones, not random.
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet.weights_source, weights_only=True))
    assert model.classifier[1].weight.std() > 0.01


def test_image_features_shape_and_determinism(mobilenet, tux_items):
    cfg = DecodeConfig()
    imgs = np.stack([decode_image(b, cfg)[0] for b in tux_items.images[:4]])
    a, b = mobilenet(imgs), mobilenet(imgs)
    assert a.shape == (4, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (a >= 0).all() and a.std() > 0  # post-ReLU pooled activations
    assert mobilenet(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)


def test_same_class_images_are_closer(mobilenet, tux_items):
    """Real features carry meaning: mean within-class cosine > between-class on two classes."""
    cfg = DecodeConfig()
    labels = np.array(tux_items.labels)
    idx = [i for c in ("animals", "food") for i in np.flatnonzero(labels == c)[:12]]
    x = mobilenet(np.stack([decode_image(tux_items.images[i], cfg)[0] for i in idx]))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim, y = x @ x.T, labels[idx]
    same = sim[(y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)].mean()
    diff = sim[y[:, None] != y[None, :]].mean()
    assert same > diff + 0.05


def test_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # Nothing cached and no offline package for ResNet-50: the download URL (needs internet).
    assert resolve_weights("resnet50", "auto").startswith("https://")
    # A checkpoint in torchvision's standard cache is found first.
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(torchvision.models.resnet18().state_dict(), ckpt / url.rsplit("/", 1)[1])
    model, source = build_image_encoder("resnet18", "auto")
    assert source == str(ckpt / url.rsplit("/", 1)[1])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    assert resolve_weights("resnet18", "random") is None


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found at"):
        build_image_encoder("resnet50", str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit resnet50"):
        build_image_encoder("resnet50", str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="unknown image model"):
        build_image_encoder("vgg99")


def test_minilm_embeds_meaning():
    enc = MiniLMEncoder()
    x = enc.encode(["a cat sleeping", "a kitten napping", "a red truck on the road"])
    assert x.shape == (3, 384)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2
    assert "_model" in enc.__getstate__() and enc.__getstate__()["_model"] is None


def test_doc2vec_is_deterministic_and_trained_on_the_captions():
    texts = [f"the {a} {b} runs" for a in ("red", "blue", "green") for b in ("fox", "car", "dog")] * 3
    cfg = Doc2VecConfig(vector_size=16, epochs=5, min_count=1)
    a = Doc2VecEncoder(cfg, seed=1).fit(texts).encode(texts[:4])
    b = Doc2VecEncoder(cfg, seed=1).fit(texts).encode(texts[:4])
    assert a.shape == (4, 16)
    np.testing.assert_array_equal(a, b)
    enc = Doc2VecEncoder(cfg, seed=1).fit(texts)
    assert "fox" in enc.model.wv
    np.testing.assert_array_equal(a[0], enc.model.dv[0])  # a training caption keeps its learned vector
    unseen = enc.encode(["the red dog walks"])
    np.testing.assert_array_equal(unseen, enc.encode(["the red dog walks"]))


def test_tfidf_svd():
    texts = ["apple banana", "banana cherry", "cherry apple", "dog cat", "cat mouse", "mouse dog"]
    enc = TfidfSvdEncoder(TfidfConfig(dims=2)).fit(texts)
    x = enc.encode(texts)
    assert x.shape == (6, 2) and enc.dim == 2


def test_text_encoder_factory():
    assert isinstance(make_text_encoder(TextEncoderConfig(model="tfidf")), TfidfSvdEncoder)
    with pytest.raises(ValueError, match="unknown text model"):
        make_text_encoder(TextEncoderConfig(model="bert"))


def test_fitted_encoders_learn_from_a_bounded_sample_that_ignores_the_file_layout(tmp_path):
    """caption_sample: at most fit_sample captions, chosen by a keyed hash of the ids, so splitting the
    same items into other files changes nothing; all of them when fit_sample covers the archive."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymmc.features.decode import DecodeConfig
    from raymmc.features.extract import caption_sample
    from raymmc.io.shards import discover

    n = 300
    ids = [f"item-{i}" for i in range(n)]
    caps = [f"caption number {i}" if i % 7 else "" for i in range(n)]  # every 7th empty: never sampled

    def archive(name: str, cuts: list[int]) -> list:
        root = tmp_path / name
        root.mkdir()
        for j, (a, b) in enumerate(zip([0, *cuts], [*cuts, n])):
            pq.write_table(pa.table({"id": ids[a:b], "caption": caps[a:b]}), root / f"part-{j:05d}.parquet")
        return discover(str(root))

    one, three = archive("one", []), archive("three", [50, 220])
    sample = caption_sample(one, DecodeConfig(), 40, seed=0, storage=None)
    assert len(sample) == 40 and "" not in sample and len(set(sample)) == 40
    assert caption_sample(three, DecodeConfig(), 40, seed=0, storage=None) == sample
    assert caption_sample(one, DecodeConfig(), 40, seed=1, storage=None) != sample
    everything = caption_sample(three, DecodeConfig(), 10_000, seed=0, storage=None)
    assert sorted(everything) == sorted(c for c in caps if c)


def test_weights_from_object_storage_use_the_runs_storage_options(s3_bucket, tmp_path):
    """extract.image.weights=s3://... is read with storage.* (here an S3-compatible server's endpoint), as the
    archive is: a MinIO endpoint set only in the config reaches the weights too."""
    import boto3

    from raymmc.io.storage import StorageOptions

    endpoint, bucket = s3_bucket
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").upload_file(
        str(tmp_path / "r18.pth"), bucket, "weights/r18.pth")
    model, source = build_image_encoder("resnet18", f"s3://{bucket}/weights/r18.pth",
                                        StorageOptions(endpoint_url=endpoint, region="us-east-1"))
    assert source == f"s3://{bucket}/weights/r18.pth"
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
