"""Serving on a cluster, whose replicas run on other nodes than the one that resolved the model.

Before `serve deploy` to a cluster the flow publishes the deploy stage's model dir and lineage to shared
storage (tasks/deploy/publish.py; here S3 through moto's server), and a replica copies the dir to its node
(serving/fetch.py). Checked where users touch it: the cluster's Serve config names nothing of this machine
and passes Ray's schema; publishing is content-addressed (a redeploy uploads nothing); a replica given the
published URI (Serve's `build_app` args, or `tinyllama serve --model <URI>`) loads the same weights from its
node's copy; a dir corrupted on S3 or never published is refused and leaves nothing in the node's cache.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _params_file(workspace: Path, bucket: str | None, model: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {"data": str(workspace / "data"), "models": str(workspace / "models"),
                    "metrics": str(workspace / "metrics"), "shared": f"s3://{bucket}/shared" if bucket else None}
    raw["deploy"].update(model=str(model), draft="prompt-lookup")
    path = workspace / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _publish(workspace: Path, model: Path) -> tuple[dict, str]:
    """The deploy stage's artifacts for `model`, then `tinyllama publish`; the cluster's config and the bucket."""
    import s3fs

    from tasks.cli import main as cli
    from tasks.deploy.stage import write_artifacts
    from tasks.params import load_params

    bucket = f"serving-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem().mkdir(bucket)
    params_file = _params_file(workspace, bucket, model)
    write_artifacts(load_params(params_file))
    out = workspace / "cluster" / "serve_config.yaml"
    assert cli(["publish", "--params", str(params_file), "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text()), bucket


def test_the_cluster_config_names_only_shared_storage_and_a_redeploy_uploads_nothing(tmp_path, s3_env, capsys,
                                                                                     served_model_dir):
    import s3fs
    from ray.serve.schema import ServeDeploySchema

    from serving.loader import lineage
    from tasks.deploy.publish import publish_model_dir

    config, bucket = _publish(tmp_path, served_model_dir)
    ServeDeploySchema.model_validate(config)
    args = config["applications"][0]["args"]
    assert args["model"].startswith(f"s3://{bucket}/shared/serving/") and args["model"].endswith("/chat-model")
    assert args["lineage_file"].startswith(f"s3://{bucket}/shared/serving/lineage-")
    assert args["draft"] == "prompt-lookup"
    text = yaml.safe_dump(config)
    assert str(tmp_path) not in text and str(served_model_dir) not in text, "a path of this machine"
    assert lineage(served_model_dir, args["lineage_file"])["model_ref"] == str(served_model_dir)

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    seal = args["model"].removeprefix("s3://") + "/serving-seal.json"
    written = fs.info(seal)["LastModified"]
    assert publish_model_dir(served_model_dir, f"s3://{bucket}/shared/serving") == args["model"]
    assert fs.info(seal)["LastModified"] == written, "the same weights were uploaded again"

    from tasks.cli import main as cli

    capsys.readouterr()
    no_shared = _params_file(tmp_path / "local", None, served_model_dir)
    assert cli(["publish", "--params", str(no_shared), "--out", str(tmp_path / "x.yaml")]) == 2
    assert capsys.readouterr().err.startswith("tinyllama publish: error: paths.shared: serving on a cluster")
    assert not (tmp_path / "x.yaml").exists()
    with_shared = _params_file(tmp_path / "undeployed", bucket, served_model_dir)
    assert cli(["publish", "--params", str(with_shared), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "no Serve config to publish: run the deploy stage first" in capsys.readouterr().err

    changed = shutil.copytree(served_model_dir, tmp_path / "changed" / "chat-model")
    (changed / "generation_config.json").write_text('{"stop_strings": ["###"]}')
    assert publish_model_dir(changed, f"s3://{bucket}/shared/serving") != args["model"]


def test_a_replica_loads_the_published_dir_from_its_nodes_cache(tmp_path, s3_env, served_model_dir, monkeypatch):
    """What a replica does with the cluster's args (serving.loader.load, as `build_app`'s replica calls it), and
    `tinyllama serve --model <URI>` handing the URI to its replica unresolved."""
    import argparse

    import torch

    from model.hf import load_hf
    from serving.loader import load
    from tasks.deploy.publish import publish_model_dir
    from tasks.deploy.serve import add_arguments, serve_args

    config, _ = _publish(tmp_path, served_model_dir)
    args = config["applications"][0]["args"]
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("TINYLLAMA_MODEL_CACHE", str(cache))
    served = load(args["model"], lineage_file=args["lineage_file"])
    (copy,) = [p.parent for p in cache.rglob("serving-seal.json")]
    assert served.directory == copy and served.name == "chat-model"
    assert served.lineage["model_ref"] == str(served_model_dir) and served.chat_template
    for file in (f for f in served_model_dir.rglob("*") if f.is_file()):
        assert (copy / file.relative_to(served_model_dir)).read_bytes() == file.read_bytes(), file.name
    local = load_hf(served_model_dir).state_dict()
    assert all(torch.equal(value, local[name]) for name, value in served.model.state_dict().items())
    inode = (copy / "model.safetensors").stat().st_ino
    assert load(args["model"]).directory == copy
    assert (copy / "model.safetensors").stat().st_ino == inode, "a second replica on the node copied it again"
    assert publish_model_dir(copy, args["model"].rsplit("/", 2)[0]) == args["model"], "a node's copy published again"

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert serve_args(parser.parse_args(["--model", args["model"]]))["model"] == args["model"]


def test_a_dir_corrupted_on_s3_or_never_published_is_refused_and_not_cached(tmp_path, s3_env, served_model_dir):
    import s3fs

    from serving.fetch import local_model_dir

    config, bucket = _publish(tmp_path, served_model_dir)
    uri = config["applications"][0]["args"]["model"]
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    weights = uri.removeprefix("s3://") + "/model.safetensors"
    fs.pipe_file(weights, fs.cat_file(weights)[:1000])
    cache = tmp_path / "node-cache"
    with pytest.raises(OSError, match=r"model\.safetensors: the copy does not match its sha256"):
        local_model_dir(uri, cache)
    with pytest.raises(ValueError, match=r"^model: .* has no serving-seal\.json: not a published model dir"):
        local_model_dir(f"s3://{bucket}/shared/serving/0123/chat-model", cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "a refused copy was left in the cache"
