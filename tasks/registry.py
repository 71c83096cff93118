"""The MLflow Model Registry for chat models: register, crown the best, and resolve a reference.

Every chat model the pipeline trains (SFT, and SFT+DPO) is a *version* of one registered model
(`sft.registered_model`, `tinyllama-chat`), its HF dir logged as artifacts of the run that trained
it, tagged with its lineage. The alias `champion` names the version with the best chat accuracy on
held-out wordings (questions worded as no SFT/DPO example is, tasks/sft/wordings.py) and moves only
when a new version beats it (a version tagged before that measure, without `ACCURACY_TAG`, counts
as -1), so `models:/tinyllama-chat@champion` is always the best chat model trained so far
(quantize and deploy consume it through `resolve_model`).

Re-registering the same weights (a re-run that changed nothing) finds the existing version by
its weights hash instead of adding a duplicate.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from model.atomic import replace_dir
from model.files import model_cache_root
from tasks.errors import UserError
from tasks.files import sha256_file
from tasks.layout import CONFIG_FILE, WEIGHTS_FILE

CHAMPION = "champion"
ACCURACY_TAG, WEIGHTS_TAG = "heldout_chat_accuracy", "weights_sha256"
_REF = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: bool      # whether it holds the alias after this registration
    new: bool           # False: these weights were already a version


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_chat_model(tracking_uri: str, name: str, run_id: str, model_dir: Path, artifact_path: str,
                        tags: dict[str, str], chat_accuracy: float) -> Registered:
    """Log `model_dir` under `<artifact_path>-<weights hash prefix>` of run `run_id` (unique: a later
    model never overwrites the files an earlier version points at) and register it as a version of
    `name` (`tags` plus its held-out chat accuracy and weights hash); move `champion` to it if it is
    the best."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    weights = sha256_file(Path(model_dir) / WEIGHTS_FILE)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Chat models of the tinyllama pipeline; "
                                                         f"@{CHAMPION} is the best chat accuracy on held-out "
                                                         "wordings.")
    existing = client.search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{weights}'")
    if existing:
        version, new = existing[0], False
    else:
        path = f"{artifact_path}-{weights[:12]}"
        client.log_artifacts(run_id, str(model_dir), path)
        all_tags = {**tags, ACCURACY_TAG: f"{chat_accuracy:.6f}", WEIGHTS_TAG: weights}
        version = client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id,
                                              tags={k: str(v) for k, v in all_tags.items()})
        new = True
    champion = _champion(client, name)
    best = champion is not None and float(champion.tags.get(ACCURACY_TAG, "-1")) >= chat_accuracy
    if champion is None or (not best and champion.version != version.version):
        client.set_registered_model_alias(name, CHAMPION, version.version)
        champion = version
    return Registered(name, str(version.version), str(champion.version) == str(version.version), new)




def _complete(directory: Path, weights: str | None) -> bool:
    path = directory / WEIGHTS_FILE
    return (directory / CONFIG_FILE).is_file() and path.is_file() and (weights is None or sha256_file(path) == weights)


def resolve_model(ref: str, tracking_uri: str) -> Path:
    """A local HF dir for `ref`: the dir itself, or the registered version `models:/<name>@<alias>` /
    `models:/<name>/<version>` names, downloaded from its run's artifacts into the cache
    (`$TINYLLAMA_MODEL_CACHE`, else ~/.cache/tinyllama/models) once and checked against its
    weights hash. A ref that names nothing is a `UserError` naming it."""
    match = _REF.fullmatch(ref)
    if match is None:
        if ref.startswith("models:/"):
            raise UserError(f"model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        if not Path(ref).is_dir():
            raise UserError(f"model {ref!r}: not a directory (nor a models:/ reference)")
        return Path(ref)
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"model {ref!r}: no MLflow store at {tracking_uri} (run the pipeline first, or point "
                        "MLFLOW_TRACKING_URI / --tracking-uri at the store that holds the registry)")
    client, name = _client(tracking_uri), match["name"]
    try:
        version = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                   else client.get_model_version(name, match["version"]))
    except MlflowException as exc:
        raise UserError(f"model {ref!r}: not in the registry at {tracking_uri} "
                        f"({str(exc).splitlines()[0]})") from None
    target = model_cache_root() / name / str(version.version)
    weights = version.tags.get(WEIGHTS_TAG)
    if _complete(target, weights):
        return target
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        downloaded = Path(download_artifacts(artifact_uri=version.source, dst_path=str(scratch),
                                             tracking_uri=tracking_uri))
        if not _complete(downloaded, weights):
            raise UserError(f"model {ref!r}: version {version.version}'s artifacts ({version.source}) are not "
                            "a complete model dir matching its weights_sha256 tag")
        replace_dir(downloaded, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
