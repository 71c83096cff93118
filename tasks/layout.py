"""The on-disk contract of docs/CONTRACTS.md in one home: every path a stage reads or writes.

Why one module: stages hand each other files, and a path joined by hand in two places drifts
(a renamed dir, an `s3://` root made "absolute" as if it were local). Here every stage path is
derived from params once, with the file names the contract fixes; the model-level names
(`config.json`, `model.safetensors`, `tokenizer.model`) are re-exported from model/, where they
are defined, so `grep` for a file name finds this module and model/ only.

Local paths come out absolute (Ray workers and subprocesses may run elsewhere than the driver's
cwd); URIs (`s3://…`) are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.files import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SERVING_SEAL,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
    TOKENIZER_MODEL_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
)
from tasks.params import Params

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE",
           "WEIGHTS_INDEX_FILE", "TOKENIZER_MODEL_FILE", "MANIFEST_FILE", "EVAL_TASKS_FILE", "MILESTONE_SEAL",
           "SERVE_CONFIG_FILE", "LINEAGE_FILE", "SERVING_SEAL", "RUN_FILE", "COMPLETE_FILE", "CHECKPOINT_FILE",
           "EVAL_REPORT_FILES", "Layout", "is_uri", "resolve", "join", "with_absolute_paths", "shard_location"]

MANIFEST_FILE = "manifest.json"        # {paths.data}/prepared/manifest.json
EVAL_TASKS_FILE = "tasks.json"         # {paths.data}/eval/tasks.json: the tiny profile's eval task registry
MILESTONE_SEAL = "milestone.json"      # written last into a milestone in a run's dir: its files' sha256
SERVE_CONFIG_FILE = "serve_config.yaml"  # {paths.models}/deploy/: what `serve deploy` runs
LINEAGE_FILE = "lineage.json"          # {paths.models}/deploy/: where the served weights came from
LOGS_DIR = "logs"                      # per-stage log files (git-ignored)
EVAL_REPORT_FILES = ("eval_table.md", "eval_table.csv", "eval_plot.png")  # beside eval.json in {paths.metrics}
# A training run's dir (`Layout.run_dir`, `Layout.alignment_run_dir`):
RUN_FILE = "run.json"                  # the run's MLflow run id (pretrain: and its resolved params)
COMPLETE_FILE = "complete.json"        # written when the run finished: its final metrics
CHECKPOINT_FILE = "checkpoint.json"    # written last into each resume checkpoint: step, loader state, metrics


def is_uri(path: str | Path) -> bool:
    """`s3://bucket/key`, `gs://…`, `file://…`: anything fsspec resolves by protocol."""
    return "://" in str(path)


def resolve(path: str | Path, root: Path | None = None) -> str:
    """A URI as it is; a local path made absolute (relative to `root`, default the cwd)."""
    if is_uri(path):
        return str(path)
    path = Path(path)
    return str(path if path.is_absolute() else ((root or Path.cwd()) / path).resolve())


def with_absolute_paths(params: Params, root: Path | None = None) -> Params:
    """The same params with every path made absolute (`resolve`), for processes that do not share our
    cwd: Ray workers, Ray tasks, subprocesses."""
    paths = params.paths.model_copy(update={k: resolve(v, root) for k, v in params.paths.model_dump().items()
                                            if v is not None})
    train = params.train.model_copy(update={"checkpoint_dir": resolve(params.train.checkpoint_dir, root)})
    data_dir = resolve(params.eval.data_dir, root) if params.eval.data_dir else None
    sft = params.sft and params.sft.model_copy(update={"checkpoint_dir": resolve(params.sft.checkpoint_dir, root)})
    return params.model_copy(update={"paths": paths, "train": train, "sft": sft,
                                     "eval": params.eval.model_copy(update={"data_dir": data_dir})})


def shard_location(prepared_dir: str | Path, entry: str) -> str:
    """Where a manifest's shard entry is: a URI as written (shared, content-addressed shards), else a
    path relative to the prepared dir."""
    return entry if is_uri(entry) else join(str(prepared_dir), entry)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI alike (a URI never goes through `Path`)."""
    return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])


@dataclass(frozen=True)
class Layout:
    """Every stage path of one profile, absolute. Picklable: the pretrain driver hands it to its workers."""

    data: Path
    models: Path
    metrics: Path
    checkpoints: str      # train.checkpoint_dir: runs' dirs (checkpoints, milestones), a local path or a URI
    shared: str | None    # paths.shared: a URI every node reaches, or None (one machine)
    alignment_checkpoints: str | None = None  # sft.checkpoint_dir: the same for SFT and DPO runs

    @classmethod
    def from_params(cls, params: Params, root: Path | None = None) -> Layout:
        paths = params.paths
        alignment = resolve(params.sft.checkpoint_dir, root) if params.sft is not None else None
        return cls(data=Path(resolve(paths.data, root)), models=Path(resolve(paths.models, root)),
                   metrics=Path(resolve(paths.metrics, root)), checkpoints=resolve(params.train.checkpoint_dir, root),
                   shared=paths.shared, alignment_checkpoints=alignment)

    # -- tokenizer, prepare ------------------------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        return self.models / "tokenizer"

    @property
    def tokenizer_model(self) -> Path:
        return self.tokenizer_dir / TOKENIZER_MODEL_FILE

    @property
    def prepared_dir(self) -> Path:
        return self.data / "prepared"

    @property
    def manifest(self) -> Path:
        return self.prepared_dir / MANIFEST_FILE

    @property
    def eval_items_dir(self) -> Path:
        """The embedded corpus's held-out items prepare writes (`<task>.jsonl` + tasks.json)."""
        return self.data / "eval"

    @property
    def staging_dir(self) -> Path:
        """Where prepare builds its outputs before renaming them into place."""
        return self.data / ".prepare.tmp"

    # -- pretrain, evaluate ------------------------------------------------------------------------
    @property
    def pretrain_dir(self) -> Path:
        return self.models / "pretrain"

    def milestone_dir(self, name: str) -> Path:
        """`name` is `format_tokens(milestone tokens)`: 100K, 105B, 1.5T."""
        return self.pretrain_dir / name

    def run_dir(self, run_name: str) -> str:
        """One pretraining run's resume checkpoints (Ray Train's experiment dir)."""
        return join(self.checkpoints, run_name)

    @property
    def shard_store(self) -> str | None:
        """Where prepare puts shards, content-addressed (`<sha256>.parquet`), when they must be shared."""
        return join(self.shared, "shards") if self.shared else None

    @property
    def serving_store(self) -> str | None:
        """Where `serve deploy` to a cluster publishes the served model dirs, sealed and content-addressed
        (`<sha256>/<dir name>`), for replicas on any node to fetch (tasks/deploy/publish.py)."""
        return join(self.shared, "serving") if self.shared else None

    @property
    def eval_cache(self) -> str:
        """Cached scores (tasks/evaluate/scoring.py): milestone evals on any node write there."""
        return join(self.shared, "eval_cache") if self.shared else str(self.metrics / "eval_cache")

    # -- alignment, quantization, serving ----------------------------------------------------------
    def sft_dir(self, variant: str) -> Path:
        return self.models / "sft" / variant

    def dpo_dir(self, variant: str) -> Path:
        return self.models / "dpo" / variant

    def alignment_run_dir(self, run_name: str) -> str:
        """One SFT or DPO run's dir: resume checkpoints, its tokenized data and the exported model."""
        return join(self.alignment_checkpoints, run_name)

    @property
    def quantized_dir(self) -> Path:
        return self.models / "quantized"

    @property
    def deploy_dir(self) -> Path:
        """What the deploy stage writes besides its metrics: the Serve config and the lineage file."""
        return self.models / "deploy"

    @property
    def serve_config(self) -> Path:
        return self.deploy_dir / SERVE_CONFIG_FILE

    @property
    def lineage_file(self) -> Path:
        return self.deploy_dir / LINEAGE_FILE

    # -- metrics, logs -----------------------------------------------------------------------------
    def metrics_file(self, stage: str) -> Path:
        """`{paths.metrics}/<stage>.json`, the stage's DVC metrics."""
        return self.metrics / f"{stage}.json"

    def report_file(self, name: str) -> Path:
        """Tables and plots beside the metrics (eval_table.md, eval_plot.png)."""
        return self.metrics / name

    @property
    def logs_dir(self) -> Path:
        """Full per-stage logs (Ray workers, lm-eval), next to the metrics' parent; git-ignored."""
        return self.metrics.parent / LOGS_DIR
