"""deploy/batch/score-rayjob.yaml, the KubeRay RayJob example. RayJob is a custom resource
that the Kubernetes schemas kubernetes-validate ships do not know, so its structure is
checked here, its pod templates against the Kubernetes schema (as PodTemplates), and its
entrypoint through the real CLI parser."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from modelplane.cli.main import build_parser

REPO = Path(__file__).resolve().parents[3]
RAYJOB = REPO / "deploy" / "batch" / "score-rayjob.yaml"
CRONJOB = REPO / "deploy" / "batch" / "score-cronjob.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def rayjob() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]


def score_args(entrypoint: str) -> Any:
    command = shlex.split(entrypoint.split("exec modelplane", 1)[1].replace("$DAY", "day"))
    return build_parser().parse_args(command)


def test_it_is_a_rayjob_of_the_kuberay_v1_api():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= {
        "entrypoint",
        "submissionMode",
        "backoffLimit",
        "activeDeadlineSeconds",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "rayClusterSpec",
    }
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True  # the cluster lives as long as the job
    assert spec["backoffLimit"] >= 1  # a retry resumes from the manifest
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())


def test_its_ray_version_is_one_modelplane_accepts():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["ray"]
    ray = next(Requirement(d) for d in extra if Requirement(d).name == "ray")
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] in ray.specifier


def test_the_entrypoint_runs_score_batch_on_ray_in_the_cluster():
    args = score_args(rayjob()["spec"]["entrypoint"])
    assert (args.command, args.score_command, args.engine) == ("score", "batch", "ray")
    assert args.ray_address == "auto"  # the cluster the entrypoint runs in
    assert args.output.is_absolute() and args.output.parts[1] == "data"
    assert args.cache_dir.parts[1] == "data"  # every node sees the same cache and files
    assert all(path.parts[1] == "data" for path in args.inputs)


def test_it_scores_the_same_job_as_the_cronjob():
    cron = next(d for d in yaml.safe_load_all(CRONJOB.read_text()) if d)
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    local = score_args(" ".join(container["args"]))
    on_ray = score_args(rayjob()["spec"]["entrypoint"])
    for name in ("inputs", "model", "timestamp", "keys", "partition_by", "feature_service"):
        assert getattr(local, name) == getattr(on_ray, name), name
    assert local.engine == "local"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_its_pod_templates_match_the_kubernetes_schema(version):
    for template in templates(rayjob()):
        document = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "modelplane-score-ray"},
            "template": template,
        }
        kubernetes_validate.validate(document, version, strict=True)


def test_every_pod_mounts_the_same_data_volume_and_a_shared_memory_store():
    claims = set()
    for template in templates(rayjob()):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims.add(volumes["data"]["persistentVolumeClaim"]["claimName"])
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        for container in pod["containers"]:
            assert container["image"].split(":")[-1] == VERSION
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["data"] == "/data" and mounts["shm"] == "/dev/shm"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert len(claims) == 1
