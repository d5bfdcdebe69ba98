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
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


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
