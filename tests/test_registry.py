"""tasks/registry.py against a real MLflow store (sqlite + local artifacts): versions with lineage
tags, the champion alias moving only on a better chat accuracy, no duplicate for the same weights,
and `resolve_model` for dirs, aliases and versions (downloaded once into the cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import micro
from model.hf import load_hf, save_hf
from model.llama import Llama
from tasks.errors import UserError
from tasks.registry import CHAMPION, register_chat_model, resolve_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking uri, run id, root): a local store with one run, and a private model cache (env set
    for the module: creating an MLflow database takes seconds, so the module shares one)."""
    import os

    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("chat", artifact_location=(root / "artifacts").as_uri())
    os.environ["TINYLLAMA_MODEL_CACHE"] = str(root / "cache")
    yield uri, client.create_run(experiment).info.run_id, root
    del os.environ["TINYLLAMA_MODEL_CACHE"]


def _model_dir(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_hf(Llama(micro().with_overrides(n_layer=1, dim=32, n_head=2, n_kv_head=1, mlp_dim=32)),
                   root / f"model-{seed}")


def test_champion_moves_only_to_a_better_version_and_resolves(store):
    from mlflow import MlflowClient

    uri, run_id, tmp_path = store
    tags = {"variant": "chat-a", "base_milestone": "1M", "template": "zephyr", "tokens": "1000", "dvc_stage_hash": "x"}
    first = register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(tmp_path, 1), "sft/model", tags, 0.40)
    worse = register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(tmp_path, 2), "dpo/model", tags, 0.30)
    again = register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(tmp_path, 1), "sft/model", tags, 0.40)
    assert (first.version, first.champion, first.new) == ("1", True, True)
    assert (worse.version, worse.champion) == ("2", False)
    assert (again.version, again.champion, again.new) == ("1", True, False)  # same weights: no duplicate
    tie = register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(tmp_path, 3), "dpo/model", tags, 0.40)
    assert not tie.champion  # a tie does not move the alias
    better = register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(tmp_path, 4), "x/model", tags, 0.55)
    assert (better.version, better.champion) == ("4", True)

    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("tinyllama-chat", CHAMPION)
    assert str(champion.version) == "4" and champion.tags["variant"] == "chat-a" and champion.run_id == run_id
    assert champion.tags["heldout_chat_accuracy"] == "0.550000" and len(champion.tags["weights_sha256"]) == 64

    resolved = resolve_model("models:/tinyllama-chat@champion", uri)
    assert resolved == tmp_path / "cache" / "tinyllama-chat" / "4"
    reference = load_hf(_model_dir(tmp_path, 4))
    assert all(torch.equal(a, b) for a, b in zip(load_hf(resolved).state_dict().values(),
                                                 reference.state_dict().values()))
    assert resolve_model("models:/tinyllama-chat/2", uri).name == "2"
    assert resolve_model("models:/tinyllama-chat@champion", uri) == resolved  # cached: no second download
    assert resolve_model(str(tmp_path / "model-1"), uri) == tmp_path / "model-1"


@pytest.mark.parametrize("ref, message", [
    ("models:/tinyllama-chat@nobody", r"model 'models:/tinyllama-chat@nobody': not in the registry"),
    ("models:/other/1", r"model 'models:/other/1': not in the registry"),
    ("models:/tinyllama-chat", r"expected models:/<name>@<alias> or models:/<name>/<version>"),
    ("no/such/dir", r"model 'no/such/dir': not a directory"),
])
def test_missing_refs_are_user_errors_naming_the_ref(store, ref, message):
    uri, run_id, root = store
    register_chat_model(uri, "tinyllama-chat", run_id, _model_dir(root, 1), "sft/model", {}, 0.1)
    with pytest.raises(UserError, match=message):
        resolve_model(ref, uri)


def test_a_sqlite_stores_artifacts_go_beside_its_database_not_into_the_working_directory(tmp_path):
    """MLflow's default for a sqlite store is ./mlruns of the process's directory: a stage run from the repo (or a
    test) would scatter one store's artifacts into each directory it ran in. A stage's own process, as a stage
    runs (mlflow's tracking URI is process-wide state that earlier in-process tests leave behind)."""
    import os
    import subprocess
    import sys

    import mlflow

    from tasks.tracking import local_artifacts, local_tracking_uri

    root = Path(__file__).resolve().parents[1]
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    (tmp_path / "work").mkdir()
    code = ("from tasks.params import load_params; from tasks.tracking import configure_mlflow; "
            f"print(configure_mlflow(load_params({str(root / 'params.yaml')!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "work", capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    experiment = mlflow.MlflowClient(uri).get_experiment(proc.stdout.split()[-1])
    assert experiment.artifact_location == (tmp_path / "store" / "artifacts").as_uri()
    assert list((tmp_path / "work").iterdir()) == []
    assert local_artifacts(local_tracking_uri(tmp_path)) == tmp_path / "mlflow" / "artifacts"
    assert local_artifacts("http://mlflow.internal:5000") is None
