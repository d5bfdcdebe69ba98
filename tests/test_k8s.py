"""The Kubernetes schedule of re-clustering (jobs/k8s/): a KubeRay RayJob checked against the RayJob CRD's
schema (tests/data/rayjob_schema.json, trimmed from KubeRay's CRD), and the CronJob that creates it."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "jobs" / "k8s"


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused: the API server *prunes* fields a CRD does not declare, so a
    misspelt field (``shutdownAfterJobFinish``) would be dropped without a word."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    return strict(json.loads((ROOT / "tests" / "data" / "rayjob_schema.json").read_text()))


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((K8S / "recluster-rayjob.yaml").read_text())


def test_the_rayjob_matches_kuberays_schema(rayjob, rayjob_schema):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    jsonschema.validate(rayjob, rayjob_schema)
    # the check can fail: a misspelt field, a wrong type
    typo = copy.deepcopy(rayjob)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(typo, rayjob_schema)
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, rayjob_schema)


def test_the_rayjob_runs_the_recluster_job_with_arguments_it_accepts(rayjob):
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    import recluster

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == "/opt/raymmc/jobs/recluster.py"
    args = [a.replace("/opt/raymmc/", f"{ROOT}/") for a in argv[2:]]
    parsed = recluster.build_parser().parse_args(args)
    assert Path(parsed.config).is_file() and parsed.name == "nightly"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True  # the Ray cluster goes away with the job


def test_the_cronjob_creates_the_rayjob_from_its_configmap():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "recluster-cronjob.yaml").read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount["name"] == volume["name"]
    created = container["command"][container["command"].index("-f") + 1]
    assert container["command"][:2] == ["kubectl", "create"]  # create, not apply: generateName needs it
    assert created.startswith(mount["mountPath"] + "/")
    # the set-up line in the file's header makes exactly that ConfigMap key from the RayJob manifest
    header = (K8S / "recluster-cronjob.yaml").read_text()
    setup = f"kubectl create configmap {volume['configMap']['name']} --from-file={Path(created).name}=" \
            "jobs/k8s/recluster-rayjob.yaml"
    assert setup in header
    # RBAC: the pod's service account may create RayJobs
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    [rule] = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
