import pytest

from raymmc.config import ConfigError, load_config


def test_defaults_yaml_values_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ncluster:\n  clusters: 7\n  kmeans: {nredo: 2}\nextract:\n  image: {model: resnet18}\n")
    cfg = load_config(path, ["cluster.kmeans.view=text", "extract.decode.max_pixels=1000"],
                      {"cluster": {"clusters": 9}})
    assert cfg.seed == 3 and cfg.cluster.clusters == 9  # CLI values beat the file
    assert cfg.cluster.kmeans.nredo == 2 and cfg.cluster.kmeans.view == "text"
    assert cfg.extract.image.model == "resnet18" and cfg.extract.decode.max_pixels == 1000
    assert cfg.extract.text.model == "minilm"  # untouched default
    assert cfg.to_dict()["cluster"]["kmeans"]["nredo"] == 2


@pytest.mark.parametrize("override,match", [
    ("cluster.nope=1", "unknown config key.*cluster.nope"),
    ("cluster.clusters=many", "cluster.clusters: expected int"),
    ("cluster.kmeans.view=pixels", "not one of"),
    ("cluster.clusters=1", "at least 2"),
    ("seed", "must look like key.sub=value"),
    ("cluster.algorithm=spectral", "cluster.algorithm must be one of"),
    ("cluster.params.jecl.nope=1", "cluster.params.jecl: unknown"),
    ("cluster.params.kmeans.niter=1", "no such algorithm"),
    ("extract.cpus_per_task=0", "extract.cpus_per_task must be > 0"),
    ("extract.text_gpus_per_actor=-1", "extract.text_gpus_per_actor must be >= 0"),
    ("extract.stale_attempt_hours=0", "extract.stale_attempt_hours must be > 0"),
    ("cluster.params.jecl.init_image_weight=1", "init_image_weight must be in \\(0, 1\\)"),
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_a_device_that_contradicts_use_gpu_is_refused_before_any_worker_starts():
    def cfg(*sets):
        return load_config(overrides=["cluster.algorithm=jecl", *sets])

    with pytest.raises(ConfigError, match="device=cpu contradicts cluster.train.use_gpu=True"):
        cfg("cluster.params.jecl.device=cpu", "cluster.train.use_gpu=true")
    with pytest.raises(ConfigError, match="device=cuda:0 contradicts cluster.train.use_gpu=False"):
        cfg("cluster.params.jecl.device=cuda:0", "cluster.train.use_gpu=false")
    # agreeing, 'auto', another algorithm's params, or an in-process fit: accepted
    cfg("cluster.params.jecl.device=cuda", "cluster.train.use_gpu=true")
    cfg("cluster.params.jecl.device=auto", "cluster.train.use_gpu=false")
    cfg("cluster.params.dec.device=cuda", "cluster.train.use_gpu=false")
    cfg("cluster.params.jecl.device=cpu", "cluster.train.use_gpu=true", "cluster.train.mode=local")


def test_yaml_booleans_name_the_choice_the_user_wrote():
    # PyYAML reads `off` as False: `--set archive.duplicate_images=off` must still mean "off".
    assert load_config(overrides=["archive.duplicate_images=off"]).archive.duplicate_images == "off"
    assert load_config(overrides=["archive.duplicate_images=drop"]).archive.duplicate_images == "drop"
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(overrides=["archive.duplicate_images=yes"])


def test_the_parquet_reader_is_set_on_every_init(ray_session):
    """`ray.parquet_reader` reaches the driver's Ray Data context, also when Ray was already started."""
    from raymmc.config import RayConfig
    from raymmc.raysession import init_ray

    context = ray_session.data.DataContext.get_current()
    try:
        init_ray(RayConfig(parquet_reader="v2"))
        assert context.use_datasource_v2 is True
        init_ray(load_config(values={}).ray)
        assert context.use_datasource_v2 is False  # the default: the classic reader
    finally:
        init_ray(RayConfig())


def _nested_fields(cls: type) -> list[str]:
    """The fields of ``cls`` that hold a nested config (its type, or one arm of its union, is a dataclass)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if any(dataclasses.is_dataclass(a) for a in (typing.get_args(hints[f.name]) or (hints[f.name],)))]


def test_a_partial_nested_override_keeps_the_fields_own_default():
    """``cluster.max_iter=150`` must not reset the rest of a nested config to its class's defaults where the
    enclosing field's default differs from them (a ``default_factory`` with other values)."""
    import dataclasses

    from raymmc.typed import from_dict

    @dataclasses.dataclass
    class Inner:
        optimizer: str = "sgd"
        lr: float = 0.01
        max_iter: int = 100

    @dataclasses.dataclass
    class Outer:
        name: str = "x"
        inner: Inner = dataclasses.field(default_factory=lambda: Inner(optimizer="adam", lr=1e-4))

    @dataclasses.dataclass
    class Top:
        outer: Outer = dataclasses.field(default_factory=Outer)

    assert from_dict(Outer, {"inner": {"max_iter": 150}}).inner == Inner("adam", 1e-4, 150)
    assert from_dict(Top, {"outer": {"inner": {"lr": 3e-4}}}).outer.inner == Inner("adam", 3e-4, 100)
    assert from_dict(Top, {"outer": {"name": "y"}}).outer == Outer("y", Inner("adam", 1e-4, 100))
    base = Outer("b", Inner("sgd", 0.5, 7))  # over an instance: its values, not the defaults
    assert from_dict(Outer, {"inner": {"lr": 0.2}}, base=base) == Outer("b", Inner("sgd", 0.2, 7))
    assert base == Outer("b", Inner("sgd", 0.5, 7))  # left as it was


def test_every_config_round_trips_and_an_empty_nested_override_is_the_default():
    """For the run config and every algorithm's config: ``to_dict`` -> ``from_dict`` gives it back, and
    overriding any nested config with ``{}`` changes nothing."""
    import dataclasses

    from raymmc.cluster import registry
    from raymmc.config import RunConfig
    from raymmc.typed import from_dict

    roots = [RunConfig] + [registry.config_class(name) for name in registry.available()]
    checked = 0
    for root in roots:
        default = root()
        assert from_dict(root, dataclasses.asdict(default)) == default
        for name in _nested_fields(root):
            assert from_dict(root, {name: {}}) == default, f"{root.__name__}.{name}"
            checked += 1
    assert checked >= 10
