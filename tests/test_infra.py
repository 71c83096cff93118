"""infra/: each file parsed and checked with the strongest validator available offline.

Ray's own cluster-config validator (its JSON schema plus defaults) for `ray up`; the compose
tool's `config` when installed, else the structure; the KubeRay manifest's structure and GPU
arithmetic; the Dockerfile's build steps against the Makefile's setup.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
GPUS = 16


def _yaml(path: str):
    return yaml.safe_load((INFRA / path).read_text())


def _cluster_gpus(node_types: dict) -> int:
    return sum(spec.get("min_workers", 0) * spec.get("resources", {}).get("GPU", 0) for spec in node_types.values())


def test_ray_cluster_passes_rays_validator_and_has_16_gpus():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray/cluster-16gpu.yaml")
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert _cluster_gpus(prepared["available_node_types"]) == GPUS
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in config["available_node_types"].values())


def test_rays_validator_rejects_a_broken_cluster_config():
    """The check above can fail: a misspelled key is refused by the same validator."""
    from ray.autoscaler._private.util import validate_config

    config = _yaml("ray/cluster-16gpu.yaml")
    config["available_node_types"]["gpu_a100x8"]["min_worker"] = config["available_node_types"]["gpu_a100x8"].pop("min_workers")
    with pytest.raises(Exception):
        validate_config(config)


def test_ray_cluster_runs_the_worker_image():
    config = _yaml("ray/cluster-16gpu.yaml")
    assert config["docker"]["image"] == _kuberay_images()[0]
    starts = " ".join(config["head_start_ray_commands"])
    assert "--head" in starts and "--autoscaling-config" in starts


def _kuberay_images() -> list[str]:
    job = _yaml("kuberay/rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return sorted({c["image"] for pod in pods for c in pod["spec"]["containers"]})


def test_kuberay_rayjob_structure_and_16_gpus():
    import ray

    job = _yaml("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m flows.pipeline --params configs/tinyllama-1.1b.yaml")
    assert (ROOT / "configs" / "tinyllama-1.1b.yaml").is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", "0") == group["rayStartParams"].get("num-gpus", "0")
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", "0"))
    assert gpus == GPUS
    assert len(_kuberay_images()) == 1


def _fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First-fit, largest bundles first: can every bundle sit whole on one node?"""
    free = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in bundle.items())), None)
        if node is None:
            return False
        for key, amount in bundle.items():
            node[key] -= amount
    return True


def _kuberay_nodes() -> list[dict[str, float]]:
    import json

    nodes = []
    for group in _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        resources = {"CPU": float(container["resources"]["limits"]["cpu"]),
                     "GPU": float(group["rayStartParams"].get("num-gpus", 0)),
                     **json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))}
        nodes += [resources] * group["maxReplicas"]
    return nodes


def test_both_cluster_recipes_host_the_profiles_training_workers_and_their_evals():
    """What the pretrain stage reserves before training (tasks.ray_cluster.training_bundles: 16 training
    workers with "trainer", one milestone eval with "evaluator") fits the Ray cluster config and the KubeRay
    job at full size; without the eval node group it would not (the 17th-GPU problem)."""
    from tasks.params import load_params
    from tasks.ray_cluster import training_bundles

    bundles = training_bundles(load_params(ROOT / "configs" / "tinyllama-1.1b.yaml"))
    assert len(bundles) == GPUS + 1
    node_types = _yaml("ray/cluster-16gpu.yaml")["available_node_types"]
    ray_nodes = [dict(spec["resources"]) for spec in node_types.values() for _ in range(spec.get("max_workers", 1))]
    for nodes in (ray_nodes, _kuberay_nodes()):
        assert _fits(bundles, nodes)
        assert not _fits(bundles, [n for n in nodes if "evaluator" not in n])


def _compose_tool() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_structure():
    compose = _yaml("docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(services)
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql" in command and "@postgres:5432/" in command
    assert "--artifacts-destination s3://" in command and "--workers 1" in command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    bucket = command.split("--artifacts-destination s3://")[1].split()[0]
    assert bucket in " ".join(services["minio-buckets"]["command"]), "MLflow's bucket must be created"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.skipif(_compose_tool() is None, reason="no docker compose / docker-compose to validate against the compose schema")
def test_compose_file_passes_the_compose_schema():
    proc = subprocess.run([*_compose_tool(), "-f", str(INFRA / "docker-compose.yaml"), "config", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_worker_dockerfile_builds_with_the_projects_setup():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert text.startswith("# syntax=")
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith(("#", " ")) and line.split()[0].isupper()]
    assert instructions[0] == "FROM" and "python:3.11" in text.split("FROM", 1)[1].split()[0]
    assert "make setup" in text and "TORCH_INDEX" in text and "/whl/cu" in text
    workdir = text.split("WORKDIR", 1)[1].split()[0]
    job = _yaml("kuberay/rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["workingDir"] == workdir
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", "models", "mlflow"} <= set(ignored)
    assert "setup:" in (ROOT / "Makefile").read_text()
