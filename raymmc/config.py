"""One typed configuration for a run: dataclasses, loadable from YAML, overridable as ``a.b=value``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raymmc.cluster.kmeans import KMeansConfig
from raymmc.features.decode import DecodeConfig
from raymmc.features.extract import PixelConfig
from raymmc.features.text import TextEncoderConfig
from raymmc.io.formats.options import ArchiveConfig
from raymmc.io.rundir import RunLocationError, check_run_location
from raymmc.io.storage import StorageOptions
from raymmc.train.trainer import TrainConfig
from raymmc.train.tune import TuneSettings


from raymmc.typed import ConfigError, from_dict  # noqa: F401  (re-exported)


@dataclass
class ImageEncoderConfig:
    model: str = "mobilenet_v2"  # mobilenet_v2 | resnet50 | resnet18 | none
    # "auto": torchvision's cache, then the offline package (MobileNetV2), then download.
    # Or a local path / s3:// URI of a state dict; "random" for untrained weights (smoke tests only).
    weights: str = "auto"
    batch_size: int = 32
    half_precision: bool = True  # on GPU only


@dataclass
class ExtractConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    pixels: PixelConfig = field(default_factory=PixelConfig)  # for end-to-end models (MMDC)
    # Encoder actor pool: autoscales between min and max actors; one GPU each where GPUs exist.
    min_actors: int = 1
    max_actors: int = 2
    gpus_per_actor: float | None = None  # None = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # also the encoder's torch threads on CPU
    # Text encoders and the read/decode/write tasks are light next to the CNN: fractional CPUs let them share the
    # cores the image actors leave free. With whole CPUs, 2 cores = 1 image actor + 1 text actor and the tasks
    # feeding and draining them never run; with 0.5 per task, reads and writes take turns and the output lands
    # at the end instead of streaming. Each task is a process: on big nodes raise cpus_per_task to bound them.
    text_cpus_per_actor: float = 0.5
    # GPUs per caption encoder actor (a fraction shares one: 0.25 = four actors on a GPU). 0: on the CPU, and the
    # actor sees no GPU (raymmc.raysession): a transformer encoder is then ~5 ms a caption per core.
    text_gpus_per_actor: float = 0.0
    cpus_per_task: float = 0.25
    decode_batch_size: int = 64
    # Object-store memory the extraction job may hold in flight (decoded images waiting for an encoder). Ray Data's
    # default budget is a share of the object store, so on a big machine the decode tasks run far ahead of the
    # encoders and memory grows with the archive up to that share; a fixed budget keeps it flat. None = Ray's.
    buffer_mb: int | None = 512
    # Feature cache URI (features per input file, reused across runs); None = <output>/features-cache.
    cache: str | None = None
    # Runs sharing a cache write each file into a folder of their own. A run deletes another run's unfinished
    # folder only once nothing has been written to it for this long: by then its run is dead (a live one writes a
    # feature file every few seconds), and until then the folder costs storage only.
    stale_attempt_hours: float = 24.0


@dataclass
class ClusterConfig:
    algorithm: str = "kmeans"
    clusters: int = 11
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    # Per-algorithm settings (dec, jecl, dm2c, mmdc), passed to their config dataclasses.
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RayConfig:
    address: str | None = None  # None: start (or join via RAY_ADDRESS) a local cluster
    num_cpus: int | None = None  # for a local cluster
    # Ray Data's Parquet reader. "classic": Ray's long-standing ParquetDatasource. "v2": Ray 2.60's default,
    # which lists the files in a ListFiles operator of its own; on a warm 2-CPU cluster it cost 3.75 +- 1.79 s
    # per read of two small files against 0.46 +- 0.25 s for the classic one (benchmarks/parquet_reader.py),
    # and a run reads Parquet three to five times (accounting, re-clustering). "v2" spreads the listing of
    # very many files over the cluster.
    parquet_reader: Literal["classic", "v2"] = "classic"


@dataclass
class SummaryConfig:
    """What a run keeps of each cluster for the report and clusters.parquet: bounded, whatever the archive."""

    map_points: int = 3000  # the report map's uniform sample; t-SNE of 3,000 points takes a few s on one core
    top_images: int = 12  # most confident images shown per cluster (three rows of a report card)
    # Most confident items kept per cluster, with and without an image each: 4x the images shown, because text
    # lists show distinct captions and repeated captions must not leave them short.
    candidates: int = 48
    top_terms: int = 8  # c-TF-IDF terms shown per cluster and written to clusters.parquet
    # Distinct caption terms kept per cluster (its most frequent): c-TF-IDF is exact while no cluster has more,
    # and 10k terms x K clusters stays a few MB on the driver.
    max_terms: int = 10_000
    representatives: int = 10  # most confident ids per cluster in clusters.parquet


@dataclass
class RunConfig:
    input: str | None = None  # None: build and use the demo data set
    output: str = "runs"  # a run directory is created under this URI
    run_name: str | None = None  # default: <dataset>-<algorithm>-<timestamp>
    demo_dataset: str = "tuxpaint"
    seed: int = 0
    storage: StorageOptions = field(default_factory=StorageOptions)
    # How to read the input: its format (auto-detected by default) and per-format settings (--input-format).
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    report: bool = True  # report/index.html (clusters.parquet is written either way)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)  # `raymmc tune` only

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"cluster.kmeans.nredo=10"`` -> ``{"cluster": {"kmeans": {"nredo": 10}}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw != "" else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def with_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``data`` (a config as a dict) with ``key=value`` overrides applied."""
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``values`` (from CLI flags) <- ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    data = with_overrides(_merge(data, values or {}), overrides)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


ALGORITHMS = ("kmeans", "dec", "jecl", "dm2c", "mmdc", "auto")


def validate(cfg: RunConfig) -> None:
    from raymmc.cluster.registry import make_config

    if cfg.cluster.algorithm not in ALGORITHMS:
        raise ConfigError(f"cluster.algorithm must be one of {', '.join(ALGORITHMS)}, not {cfg.cluster.algorithm!r}")
    for name, params in cfg.cluster.params.items():
        if name not in ALGORITHMS or name in ("kmeans", "auto"):
            raise ConfigError(f"cluster.params.{name}: no such algorithm (use cluster.kmeans for k-means)")
        try:
            algo_cfg = make_config(name, params)  # the algorithm's own typed config checks keys and values
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cluster.params.{name}: {exc}") from exc
        # A Ray Train worker given no GPU sees none (raymmc.raysession), and one given a GPU must use it: caught
        # here once, not as a worker failure retried max_failures times, or a GPU reserved and left idle.
        device, use_gpu = str(getattr(algo_cfg, "device", "auto")), cfg.cluster.train.use_gpu
        if name == cfg.cluster.algorithm and cfg.cluster.train.mode != "local" and use_gpu is not None and (
                device != "auto" and device.startswith("cuda") != use_gpu):
            raise ConfigError(f"cluster.params.{name}.device={device} contradicts cluster.train.use_gpu={use_gpu}: "
                              "leave the device 'auto' (it follows use_gpu) or make them agree")
    try:
        check_run_location(cfg.output, cfg.run_name)
    except RunLocationError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.cluster.train.workers < 1:
        raise ConfigError("cluster.train.workers (--workers) must be at least 1")
    if cfg.cluster.train.local_max_items < 0:
        raise ConfigError("cluster.train.local_max_items must be at least 0")
    sm = cfg.summary
    if sm.map_points < 0 or sm.top_images < 0 or sm.top_terms < 0 or sm.representatives < 0:
        raise ConfigError("summary: map_points, top_images, top_terms and representatives must be >= 0")
    if sm.candidates < max(sm.top_images, sm.representatives, 1) or sm.max_terms < max(sm.top_terms, 1):
        raise ConfigError("summary: need candidates >= top_images, representatives and max_terms >= top_terms")
    if cfg.archive.max_member_bytes < 1:
        raise ConfigError("archive.max_member_bytes must be >= 1")
    if cfg.archive.duplicate_groups_shown < 0:
        raise ConfigError("archive.duplicate_groups_shown must be >= 0")
    for key in ("image_dim", "text_dim"):
        if getattr(cfg.archive, key) is not None and getattr(cfg.archive, key) < 1:
            raise ConfigError(f"archive.{key} must be >= 1 (or null: the first file's)")
    if cfg.cluster.clusters < 2:
        raise ConfigError("cluster.clusters must be at least 2")
    t = cfg.tune
    if t.trials < 1 or t.max_concurrent < 1 or t.max_items < 2 or t.score_rows < 3:
        raise ConfigError("tune: need trials >= 1, max_concurrent >= 1, max_items >= 2, score_rows >= 3")
    if not 0.0 <= t.agreement_floor <= 1.0:
        raise ConfigError(f"tune.agreement_floor is an NMI: between 0 and 1, not {t.agreement_floor}")
    if t.report_steps < 1 or t.grace_steps < 1 or t.reduction_factor < 2:
        raise ConfigError("tune: need report_steps >= 1, grace_steps >= 1, reduction_factor >= 2")
    if t.cpus_per_trial < 0 or t.gpus_per_trial < 0:
        raise ConfigError("tune: cpus_per_trial and gpus_per_trial must be >= 0")
    from raymmc.train.tune_space import space as search_space

    for name, overrides in t.space.items():  # each algorithm's searched names and specs, before any work
        if not isinstance(overrides, dict):
            raise ConfigError(f"tune.space.{name} must be a mapping of searched names to [kind, ...] specs")
        search_space(name, overrides)
    if cfg.extract.min_actors < 1 or cfg.extract.max_actors < cfg.extract.min_actors:
        raise ConfigError("extract: need 1 <= min_actors <= max_actors")
    if cfg.extract.buffer_mb is not None and cfg.extract.buffer_mb < 64:
        raise ConfigError("extract.buffer_mb must be at least 64 (or null for Ray Data's default)")
    for key in ("cpus_per_actor", "text_cpus_per_actor", "cpus_per_task"):
        if not getattr(cfg.extract, key) > 0:
            raise ConfigError(f"extract.{key} must be > 0")
    if cfg.extract.text_gpus_per_actor < 0:
        raise ConfigError("extract.text_gpus_per_actor must be >= 0")
    if not cfg.extract.stale_attempt_hours > 0:
        raise ConfigError("extract.stale_attempt_hours must be > 0 (a live run's folder must never look abandoned)")
    from PIL import Image

    Image.init()
    known = set(Image.OPEN)  # the formats Pillow can open
    formats = cfg.extract.decode.formats
    if not formats or any(not isinstance(f, str) or f not in known for f in formats):
        raise ConfigError(f"extract.decode.formats must be a list of Pillow format names ({', '.join(sorted(known))}),"
                          f" got {list(formats)!r}")
    if "EPS" in formats:
        raise ConfigError("extract.decode.formats: EPS runs Ghostscript on the archive's bytes; convert such images")
