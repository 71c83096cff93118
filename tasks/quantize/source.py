"""Which model the stage quantizes, and its lineage (the MLflow run and DVC output it came from).

`quantize.source` is a registry ref (`models:/tinyllama-chat@champion`, resolved by
`tasks.registry.resolve_model`), `pretrain/last` (the milestone with the most tokens, whatever the
schedule), a dir under `paths.models` (`pretrain/1M`, `sft/<variant>`), or any HF Llama dir.
The lineage goes into the GGUF metadata and the MLflow run, so a file found on a
laptop can be traced back to the training run and the exact DVC output it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.errors import UserError
from tasks.evaluate.checkpoints import find_milestones, read_checkpoint
from tasks.files import read_json
from tasks.layout import CONFIG_FILE, Layout
from tasks.params import Params
from tasks.tracking import client, tracking_uri

REGISTRY_PREFIX = "models:/"
LAST_MILESTONE = "pretrain/last"


@dataclass(frozen=True)
class Source:
    ref: str
    directory: Path
    name: str                       # the stem of the output files
    lineage: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.lineage.get("mlflow_run_id")


def resolve_source(params: Params) -> Source:
    ref, layout = params.quantize.source, Layout.from_params(params)
    registry: dict = {}
    if ref.startswith(REGISTRY_PREFIX):
        directory, registry = _from_registry(ref, tracking_uri(params))
        run_id = registry.get("mlflow_run_id")
        default_name = ref.removeprefix(REGISTRY_PREFIX).replace("@", "-").replace("/", "-")
    else:
        if ref == LAST_MILESTONE:
            directory = find_milestones(layout)[-1].directory
        else:
            directory = layout.models / ref if (layout.models / ref).is_dir() else Path(ref).resolve()
        if not directory.is_dir():
            raise UserError(f"quantize.source: {ref!r} is neither a dir under {layout.models} nor a directory")
        run_id = _run_id_of_dir(layout, directory)
        default_name = ("-".join(directory.relative_to(layout.models).parts)
                        if directory.is_relative_to(layout.models) else directory.name)
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"quantize.source: {directory} (from {ref!r}) has no {CONFIG_FILE}: not a HF model dir")
    lineage = {"source": ref, "weights_sha256": read_checkpoint(directory).weights_sha256}
    if run_id:
        lineage["mlflow_run_id"] = run_id
    lineage.update(dvc_lineage(directory) or registry)
    return Source(ref, directory, params.quantize.name or default_name, lineage)


def _from_registry(ref: str, uri: str) -> tuple[Path, dict]:
    from tasks.registry import resolve_model

    directory = Path(resolve_model(ref, uri))
    return directory, _registry_lineage(ref, uri)


def _registry_lineage(ref: str, uri: str) -> dict:
    """Where the registered version came from: the run that logged it (`mlflow_run_id`, for the link from
    our run) and the DVC stage that trained it with that stage's hash (the version's tags)."""
    name, _, rest = ref.removeprefix(REGISTRY_PREFIX).partition("/")
    mlflow_client = client(uri)
    if "@" in name:
        name, alias = name.split("@", 1)
        version = mlflow_client.get_model_version_by_alias(name, alias)
    else:
        version = mlflow_client.get_model_version(name, rest)
    tags = version.tags or {}
    lineage = {"mlflow_run_id": version.run_id, "registered_version": str(version.version),
               "dvc_stage": tags.get("stage"), "dvc_stage_hash": tags.get("dvc_stage_hash")}
    return {key: value for key, value in lineage.items() if value}


def _run_id_of_dir(layout: Layout, directory: Path) -> str | None:
    """A pretrain milestone's run is the pretrain run (metrics/pretrain.json); other dirs may name
    theirs in config.json (`tinyllama.mlflow_run_id`)."""
    meta = read_json(directory / CONFIG_FILE).get("tinyllama") or {}
    if meta.get("mlflow_run_id"):
        return str(meta["mlflow_run_id"])
    pretrain_metrics = layout.metrics_file("pretrain")
    if directory.is_relative_to(layout.pretrain_dir) and pretrain_metrics.is_file():
        return read_json(pretrain_metrics).get("mlflow_run_id")
    return None


def dvc_lineage(directory: Path, lock_file: Path = Path("dvc.lock")) -> dict:
    """{"dvc_stage", "dvc_out", "dvc_md5"}: the dvc.lock output that holds `directory` (the hash DVC
    recorded for it), or {} when the model did not come out of this repo's DAG."""
    if not lock_file.is_file():
        return {}
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    target = directory.resolve()
    for stage, entry in stages.items():
        for out in entry.get("outs", []):
            out_path = (lock_file.parent / out["path"]).resolve()
            if target == out_path or target.is_relative_to(out_path):
                return {"dvc_stage": stage, "dvc_out": out["path"], "dvc_md5": out.get("md5", "")}
    return {}
