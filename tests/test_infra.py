"""infra/: each file parsed and checked with the strongest validator available offline.

Ray's own cluster-config validator (its JSON schema plus defaults) for `ray up`; the compose
tool's `config` when installed, else the structure; the KubeRay manifest's structure and GPU
arithmetic; the Dockerfile's build steps against the Makefile's setup.
"""

from __future__ import annotations

import copy
import re
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
    config["available_node_types"]["gpu_a100x8"]["min_worker"] = (
        config["available_node_types"]["gpu_a100x8"].pop("min_workers"))
    with pytest.raises(Exception, match="'min_worker' was unexpected"):
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


def test_shared_services_ask_for_credentials_that_every_node_has():
    """MLflow runs its basic-auth app and Prefect its basic auth, with secrets that have no default (compose's
    `${VAR:?}`) from the git-ignored infra/.env; the VM nodes get the MLflow password from SSM at boot."""
    import json
    import os

    from configobj import ConfigObj

    compose = _yaml("docker-compose.yaml")
    mlflow, prefect = compose["services"]["mlflow"], compose["services"]["prefect"]
    assert "--app-name basic-auth" in " ".join(mlflow["command"])
    env = mlflow["environment"]
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[secret]), f"{secret} must be required, with no default"
    auth_string = prefect["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert re.fullmatch(r"\$\{PREFECT_API_AUTH_STRING:\?[^}]+\}", auth_string), "the clients' variable, required"
    mounts = dict(reversed(v.split(":")[:2]) for v in mlflow["volumes"])
    ini = ConfigObj(str(INFRA / mounts[env["MLFLOW_AUTH_CONFIG_PATH"]].removeprefix("./")))
    database = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert mounts[os.path.dirname(database)] in compose["volumes"], "the users' database must outlive the container"
    dockerfile = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    (locked,) = re.findall(r"^mlflow==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert f'"mlflow[auth]=={locked}"' in dockerfile and "flask-wtf==" in dockerfile
    assert "/infra/.env" in (ROOT / ".gitignore").read_text().splitlines()

    config = _yaml("ray/cluster-16gpu.yaml")
    env_files = [o.split()[1].replace("/home/ubuntu/", "~/") for o in config["docker"]["run_options"]
                 if o.startswith("--env-file")]
    (written,) = [c for c in config["initialization_commands"] if "MLFLOW_TRACKING_PASSWORD=" in c]
    assert "/tinyllama/mlflow-password" in written and written.split("> ")[-1].strip() in env_files
    policy = json.loads((INFRA / "aws" / "tinyllama-node-policy.json").read_text())
    assert "parameter/tinyllama/mlflow-password" in json.dumps(policy)


@pytest.mark.skipif(_compose_tool() is None,
                    reason="no docker compose / docker-compose to validate against the compose schema")
def test_compose_file_passes_the_compose_schema():
    import os

    secrets = {name: "x" for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                       "PREFECT_API_AUTH_STRING")}
    proc = subprocess.run([*_compose_tool(), "-f", str(INFRA / "docker-compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, env={**os.environ, **secrets})
    assert proc.returncode == 0, proc.stderr


def _dockerfile_stages() -> list[dict]:
    """The Dockerfile as BuildKit reads it: continuation lines joined, comments dropped, one entry per stage
    with its base, name and (instruction, arguments) list; ARGs before the first FROM substituted."""
    lines, pending = [], ""
    for raw in (INFRA / "docker" / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    assert not pending, "a continued line never ends"
    known = {"FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL",
             "USER", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
    args, stages = {}, []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        assert instruction in known, f"not a Dockerfile instruction: {line[:60]}"
        if instruction == "ARG" and not stages:
            name, _, value = rest.partition("=")
            args[name] = value
        elif instruction == "FROM":
            words = rest.split()
            base = words[0]
            for name, value in args.items():
                base = base.replace("${" + name + "}", value)
            stages.append({"base": base, "name": words[2] if len(words) == 3 and words[1].upper() == "AS" else None,
                           "steps": []})
        else:
            stages[-1]["steps"].append((instruction, rest))
    return stages


def test_worker_dockerfile_parses_into_a_cuda_image_with_a_compiler_and_a_builder_stage():
    stages = _dockerfile_stages()
    by_name = {s["name"]: s for s in stages if s["name"]}
    assert stages[0]["base"].startswith("nvidia/cuda:") and "runtime" in stages[0]["base"]
    base_runs = " ".join(rest for instruction, rest in by_name["base"]["steps"] if instruction == "RUN")
    assert "build-essential" in base_runs, "Triton compiles its launcher with gcc at run time"
    assert "python3.11" in base_runs
    builder, final = by_name["builder"], stages[-1]
    assert builder["base"] == "base" and final["base"] == "base"
    assert any("pip wheel --require-hashes" in rest for _, rest in builder["steps"])
    assert any(i == "COPY" and rest.startswith("--from=builder") for i, rest in final["steps"])
    for stage in stages:  # the base's python3.11 (deadsnakes) has no pip: every pip is a venv's, made in its stage
        runs = " ".join(rest for instruction, rest in stage["steps"] if instruction == "RUN")
        assert not re.search(r"-m pip\b|(^|[\s;&|])pip3?\s", runs), f"pip outside a venv in {stage['name']}"
        for venv in re.findall(r"(\S+)/bin/pip\b", runs):
            assert f"-m venv {venv}" in runs, f"{venv}/bin/pip without `python3.11 -m venv {venv}` before it"
    installs = [rest for i, rest in final["steps"] if i == "RUN" and "pip install" in rest]
    assert installs and all("--no-index" in rest for rest in installs), "the final stage installs built wheels only"
    for stage in stages:
        for instruction, rest in stage["steps"]:
            if instruction == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert source == "." or (ROOT / source).exists(), f"COPY of a missing {source}"
    workdir = next(rest for i, rest in final["steps"] if i == "WORKDIR")
    job = _yaml("kuberay/rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["workingDir"] == workdir
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "data", "models", "mlflow", ".dvc/config.local"} <= set(ignored)


def _image_platform_tags() -> set:
    """Every wheel tag pip accepts inside the image: CPython 3.11 on x86_64 with the base's glibc."""
    from packaging.tags import compatible_tags, cpython_tags

    glibc = {"ubuntu22.04": 35, "ubuntu24.04": 39}[_dockerfile_stages()[0]["base"].rsplit("-", 1)[1]]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return set(cpython_tags((3, 11), platforms=platforms)) | set(compatible_tags((3, 11), "cp311", platforms))


def _platform_lock() -> dict:
    import tomllib

    return tomllib.loads((INFRA / "docker" / "pylock.linux-amd64-py311.toml").read_text())


def test_platform_lock_pins_requirements_lock_and_has_a_file_for_every_package_on_the_image():
    """Offline: the lock's recorded file names against the image's tags; sdists only for what the builder
    stage builds (`pip wheel` over the whole lock)."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    lock = _platform_lock()
    assert lock["lock-version"] == "1.0"
    locked = {canonicalize_name(p["name"]): p for p in lock["packages"]}
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[canonicalize_name(name)] = version
    missing = sorted(set(pins) - set(locked))
    assert not missing, f"in requirements.lock, not in the platform lock: {missing}"
    differ = {n: (v, locked[n]["version"]) for n, v in pins.items() if locked[n]["version"] != v}
    assert not differ, f"versions differ (requirements.lock, platform lock): {differ}"
    tags = _image_platform_tags()
    sdist_only = []
    for name, package in locked.items():
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert files and all(len(f["hashes"]["sha256"]) == 64 for f in files), name
        wheels = [f["name"] for f in package.get("wheels", [])]
        for wheel in wheels:
            parsed_name, parsed_version, _, _ = parse_wheel_filename(wheel)
            assert parsed_name == name and str(parsed_version) == package["version"], wheel
        if not any(parse_wheel_filename(w)[3] & tags for w in wheels):
            assert "sdist" in package, f"{name}: no wheel for the image's platform and no sdist"
            sdist_only.append(name)
    assert "llama-cpp-python" in sdist_only and locked["torch"]["version"] == pins["torch"]
    assert any(name.startswith("nvidia-cuda-runtime") for name in locked), "torch's CUDA build"


def test_the_docs_gpu_install_is_the_images_cuda_build():
    """README, Makefile and Dockerfile name the CUDA the lock's torch is built for, and its driver floor."""
    locked = {p["name"]: p["version"] for p in _platform_lock()["packages"]}
    cuda = locked["nvidia-cuda-runtime"].split(".")[0]
    assert cuda == "13", "the driver floor below (>= 580) is CUDA 13's"
    for name in ("README.md", "Makefile", "infra/docker/Dockerfile"):
        text = (ROOT / name).read_text()
        assert set(re.findall(r"\bcu(\d\d)\d\b", text)) <= {cuda}, f"{name} names another CUDA build"
        assert set(re.findall(r"CUDA (\d+)", text)) <= {cuda}, f"{name} names another CUDA version"
    assert "driver >= 580" in (ROOT / "README.md").read_text()


def test_platform_lock_refuses_a_wheel_for_another_platform():
    """The check above can fail: a macOS-only or CPython 3.12-only wheel matches none of the image's tags."""
    from packaging.utils import parse_wheel_filename

    tags = _image_platform_tags()
    assert parse_wheel_filename("torch-2.13.0-cp311-none-macosx_11_0_arm64.whl")[3].isdisjoint(tags)
    assert parse_wheel_filename("x-1.0-cp312-cp312-manylinux_2_28_x86_64.whl")[3].isdisjoint(tags)
    assert not parse_wheel_filename("x-1.0-cp311-cp311-manylinux_2_28_x86_64.whl")[3].isdisjoint(tags)


def _repo_copy_without_git(tmp_path: Path) -> Path:
    copy_root = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy_root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy_root / name)
    return copy_root


def test_dvc_repro_dry_runs_without_git_with_the_images_dvc_settings(tmp_path):
    """The image has no .git; the config file it installs as .dvc/config.local makes DVC work without it."""
    import os
    import sys

    repo = _repo_copy_without_git(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global")}
    without = subprocess.run([*dvc, "repro", "--dry"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    assert without.returncode != 0 and "git" in (without.stdout + without.stderr).lower()
    shutil.copy2(INFRA / "docker" / "dvc-config.local", repo / ".dvc" / "config.local")
    # The DAG's first stage (a dry run of later ones needs the outputs of earlier ones, with or without git).
    with_config = subprocess.run([*dvc, "repro", "--dry", "--single-item", "tokenizer"], cwd=repo, capture_output=True,
                                 text=True, env=env, timeout=120)
    assert with_config.returncode == 0, with_config.stdout[-2000:] + with_config.stderr[-2000:]
    assert "Running stage 'tokenizer'" in with_config.stdout


def _instance_types() -> tuple[dict, dict]:
    data = yaml.safe_load((INFRA / "aws" / "instance-types.yaml").read_text())
    return data["types"], data["reserve"]


def _quantity(value) -> float:
    """Kubernetes quantities as numbers: CPUs, or memory in GiB."""
    text = str(value)
    for suffix, scale in (("Gi", 1), ("Mi", 1 / 1024), ("Ti", 1024)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _kuberay_pods():
    """(where, pod spec) of every pod template of the KubeRay manifests."""
    for name in ("rayjob.yaml", "rayservice.yaml"):
        doc = _yaml(f"kuberay/{name}")
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            yield f"{name} {group['groupName']}", group["template"]
        if "submitterPodTemplate" in doc["spec"]:
            yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]


def test_kuberay_pods_fit_their_node_types_by_cpu_gpu_and_memory():
    types, reserve = _instance_types()
    job = _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    for where, template in _kuberay_pods():
        if where.endswith("submitter"):
            continue  # the job's client: no requests, scheduled wherever it fits
        node = types[template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]]
        asked = {"cpu": 0.0, "memory": 0.0, "gpu": 0.0}
        for container in template["spec"]["containers"]:
            requests = container["resources"]["requests"]
            asked["cpu"] += _quantity(requests["cpu"])
            asked["memory"] += _quantity(requests["memory"])
            asked["gpu"] += _quantity(requests.get("nvidia.com/gpu", 0))
        assert asked["cpu"] <= node["cpu"] - reserve["cpu"], (where, asked, node)
        assert asked["memory"] <= node["memory_gib"] * (1 - reserve["memory_fraction"]), (where, asked, node)
        assert asked["gpu"] <= node["gpu"], (where, asked, node)
    # the eval group's Ray CPUs cover a milestone eval's ask
    from tasks.params import load_params

    eval_ask = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml").eval.resources
    (eval_group,) = [g for g in job["workerGroupSpecs"] if "evaluator" in g["rayStartParams"].get("resources", "")]
    assert float(eval_group["rayStartParams"]["num-cpus"]) >= eval_ask["CPU"]


def test_the_old_eval_pod_fits_no_node_of_its_group():
    """The check above can fail: 8 CPUs / 64 GiB on a g5.2xlarge (8 vCPUs, 32 GiB) is refused."""
    types, reserve = _instance_types()
    node = types["g5.2xlarge"]
    assert not (8 <= node["cpu"] - reserve["cpu"] and 64 <= node["memory_gib"] * (1 - reserve["memory_fraction"]))


def test_every_ray_node_and_client_runs_token_auth_with_the_token_from_a_secret():
    config = _yaml("ray/cluster-16gpu.yaml")
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert any("ray-auth-token" in c and "auth_token" in c for c in config["initialization_commands"])
    region = config["provider"]["region"]
    aws_calls = [c for c in config["initialization_commands"] if "aws " in c]
    assert aws_calls and all(f"--region {region}" in c for c in aws_calls), "the node AMI's CLI has no region"
    # KubeRay: authOptions, so the operator itself sends the token to the dashboard (job status, Serve config)
    # and puts it in every Ray container and the submitter; a container's own RAY_AUTH_* would shadow it
    readme = (ROOT / "README.md").read_text()
    for name in ("rayjob.yaml", "rayservice.yaml"):
        spec = _yaml(f"kuberay/{name}")["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        assert cluster["authOptions"] == {"mode": "token", "secretName": "tinyllama-ray-auth"}, name
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52), "Ray's token auth"
    assert "kubectl create secret generic tinyllama-ray-auth --from-literal=auth_token=" in readme
    assert "KubeRay operator >= 1.6" in readme, "authOptions.secretName is KubeRay 1.6's"
    for where, template in _kuberay_pods():
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (where, container["name"])


def test_dashboard_and_job_api_stay_inside_the_cluster_network():
    config = _yaml("ray/cluster-16gpu.yaml")
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host" in head and "--dashboard-host=0.0.0.0" not in head
    # bound to the private IP, not localhost: `ray dashboard`'s tunnel (to the head's localhost) is refused, so
    # the runbook tunnels to the private IP and points `serve deploy` there
    assert "--dashboard-host=$(hostname -I" in head
    readme = (ROOT / "README.md").read_text()
    assert "-L 8265:$HEAD:8265" in readme and "RAY_DASHBOARD_ADDRESS=http://$(hostname -I" in readme
    assert config["provider"]["use_internal_ips"] is True
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
        assert not (rule["FromPort"] <= 8265 <= rule["ToPort"]), "the dashboard/job API port is opened"
    (policy,) = yaml.safe_load_all((INFRA / "kuberay" / "networkpolicy.yaml").read_text())
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for where, template in _kuberay_pods():
        labels = template.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{where} is not covered by the NetworkPolicy"
    for rule in policy["spec"]["ingress"]:
        if any(source == {"namespaceSelector": {}} for source in rule["from"]):
            assert [p["port"] for p in rule["ports"]] == [8000], "only Serve's port is open cluster-wide"
    compose = _yaml("docker-compose.yaml")
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${SERVICES_BIND_IP:-127.0.0.1}:"), f"{name} publishes {port} on every interface"
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "10.*" in command and "*.internal" in command, "MLflow must accept remote nodes' Host headers"


def test_every_node_has_an_instance_profile_with_the_buckets_rights():
    import json

    from tasks.params import load_params

    config = _yaml("ray/cluster-16gpu.yaml")
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
        assert node_type["node_config"]["ImageId"] != "latest_dlami", "Ray maps it to an Ubuntu 18.04 AMI"
    policy = json.loads((INFRA / "aws" / "tinyllama-node-policy.json").read_text())
    resources = " ".join(str(s["Resource"]) for s in policy["Statement"])
    params = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml")
    for uri in (params.paths.shared, params.train.checkpoint_dir):
        bucket = uri.removeprefix("s3://").split("/")[0]
        assert f"arn:aws:s3:::{bucket}/*" in resources, uri


def test_the_training_nodes_share_one_zone():
    """HSDP's gradient all-reduce between the two training nodes must not cross AZs: the VM cluster launches every
    node in one AZ and the training nodes in a cluster placement group the runbook creates; KubeRay's training
    pods require each other's zone."""
    config = _yaml("ray/cluster-16gpu.yaml")
    zone = config["provider"]["availability_zone"]
    assert re.fullmatch(rf"{config['provider']['region']}[a-z]", zone), zone
    runbook = (INFRA / "aws" / "README.md").read_text()
    trainers = {name: t for name, t in config["available_node_types"].items() if "trainer" in t.get("resources", {})}
    assert trainers
    for name, node_type in trainers.items():
        group = node_type["node_config"]["Placement"]["GroupName"]
        assert f"create-placement-group --region {config['provider']['region']} --group-name {group} " \
               "--strategy cluster" in runbook, name

    job = _yaml("kuberay/rayjob.yaml")
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        if "trainer" not in group["rayStartParams"].get("resources", ""):
            continue
        (term,) = group["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "topology.kubernetes.io/zone"
        assert term["labelSelector"] == {"matchLabels": {"ray.io/group": group["groupName"]}}  # KubeRay's label


def test_the_images_dvc_remote_is_on_the_profiles_bucket_which_every_node_may_write():
    """A cluster run syncs each stage with the image's default DVC remote (flows/repro.py): it must be a real
    remote on the bucket the profile and the node policy name."""
    import json

    from configobj import ConfigObj  # what DVC reads its config files with

    from tasks.params import load_params

    dvc = ConfigObj(str(INFRA / "docker" / "dvc-config.local"))
    url = dvc[f'remote "{dvc["core"]["remote"]}"']["url"]
    bucket = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml").paths.shared.removeprefix("s3://").split("/")[0]
    assert url.startswith(f"s3://{bucket}/"), url
    policy = json.loads((INFRA / "aws" / "tinyllama-node-policy.json").read_text())
    assert f"arn:aws:s3:::{bucket}/*" in " ".join(str(s["Resource"]) for s in policy["Statement"])


def test_the_head_has_the_gpu_and_the_disk_its_driver_side_stages_need():
    """The stages run in the driver's process on the head: its SFT/DPO scorecards, a missed milestone's
    evaluate and the deploy gate use eval.device / deploy.device there, and prepare seals every input's
    tokens on its disk before packing (`tinyllama plan`'s staging figure)."""
    from tasks.params import load_params
    from tasks.pretrain.plan import prepare_estimate

    params = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml")
    cuda = "cuda" in (params.eval.device, params.deploy.device)
    staging_gb = prepare_estimate(params)["staging_disk_gb"]
    types, _ = _instance_types()
    config = _yaml("ray/cluster-16gpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert types[head["node_config"]["InstanceType"]]["gpu"] >= cuda, "the driver's CUDA stages need a GPU"
    assert head["resources"].get("GPU") == 0, "the head's GPU is the driver's: Ray schedules nothing on it"
    (volume,) = head["node_config"]["BlockDeviceMappings"]
    assert volume["Ebs"]["VolumeSize"] >= 1.2 * staging_gb, (volume, staging_gb)
    assert volume["Ebs"].get("Throughput", 125) >= 500, "gp3's default 125 MB/s: hours to write and read it"
    job = _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
    (container,) = job["template"]["spec"]["containers"]
    assert _quantity(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= cuda
    assert job["rayStartParams"]["num-gpus"] == "0"
    volumes = {v["name"]: v for v in job["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].endswith(f"/{params.paths.data}")]
    claim = volumes[mount["name"]]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert _quantity(claim["resources"]["requests"]["storage"]) * 1.0737 >= 1.2 * staging_gb  # GiB -> GB


def test_the_autoscaler_may_read_the_ami_parameter_its_node_types_name():
    """`ImageId: resolve:ssm:...` makes RunInstances read the parameter as its caller (the head's role)."""
    import json

    config = _yaml("ray/cluster-16gpu.yaml")
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    policy = json.loads((INFRA / "aws" / "tinyllama-head-policy.json").read_text())
    allowed = [s for s in policy["Statement"] if "ssm:GetParameters" in s["Action"]]
    for image in images:
        if image.startswith("resolve:ssm:"):
            name = image.removeprefix("resolve:ssm:")
            assert any(name.startswith(r.split(":parameter", 1)[1].rstrip("*")) for s in allowed
                       for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])), name


def test_the_serving_api_key_reaches_the_gate_and_every_replica():
    import json

    from tasks.params import load_params

    env = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml").deploy.api_key_env
    config = _yaml("ray/cluster-16gpu.yaml")
    # written on the host before the container starts (as ubuntu: ~ is /home/ubuntu), read by `docker run`
    env_files = [o.split()[1].replace("/home/ubuntu/", "~/") for o in config["docker"]["run_options"]
                 if o.startswith("--env-file")]
    (written,) = [c for c in config["initialization_commands"] if f"{env}=" in c]
    assert written.split("> ")[-1].strip() in env_files and "/tinyllama/api-key" in written
    assert config["auth"]["ssh_user"] == "ubuntu"
    policy = json.loads((INFRA / "aws" / "tinyllama-node-policy.json").read_text())
    assert "parameter/tinyllama/api-key" in json.dumps(policy)
    job = _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
    service = _yaml("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for container in [job["template"]["spec"]["containers"][0]] + [g["template"]["spec"]["containers"][0]
                                                                   for g in service]:
        assert {"secretRef": {"name": "tinyllama-api-key"}} in container["envFrom"], container["name"]
