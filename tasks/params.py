"""params.yaml: every knob of every stage, validated once at the edge.

`load_params(path)` validates the whole file before any stage runs and reports *every* bad
field in one `UserError` (dotted path + value), so a typo never costs a half-built output.
Each stage reads only its own section; dvc.yaml lists exactly those keys per stage.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.config import LlamaConfig, preset
from model.files import GGUF_TYPES
from serving.auth import is_loopback
from tasks.errors import UserError

_TOKEN_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_tokens(value: int | float | str) -> int:
    """'105B' -> 105_000_000_000; also accepts plain ints and '1.5T'."""
    if isinstance(value, bool):
        raise ValueError(f"not a token count: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0 or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"not a positive whole token count: {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", str(value).upper())
    if not match:
        raise ValueError(f"not a token count: {value!r} (use e.g. 500000, '500K', '105B', '1.5T')")
    tokens = float(match.group(1)) * _TOKEN_SUFFIX[match.group(2)]
    if tokens <= 0 or not math.isclose(tokens, round(tokens)):
        raise ValueError(f"not a positive whole token count: {value!r}")
    return int(round(tokens))


def format_tokens(tokens: int) -> str:
    """105_000_000_000 -> '105B', 1_500_000_000_000 -> '1.5T', 1_048_576 -> '1048.576K' (exact, no rounding)."""
    for suffix in ("T", "B", "M", "K"):
        unit = _TOKEN_SUFFIX[suffix]
        if tokens >= unit and (tokens * 1000) % unit == 0:
            return f"{tokens / unit:.3f}".rstrip("0").rstrip(".") + suffix
    return str(tokens)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def require_unique(names: list[str], what: str) -> None:
    """A list of named entries (sources, variants): at least one, no name twice."""
    if not names:
        raise ValueError(f"at least one {what} is required")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate {what} name {dupes[0]!r}")


class Paths(Section):
    data: str = "data"
    models: str = "models"
    metrics: str = "metrics"
    # A URI every node of a Ray cluster reaches (s3://…), for what training workers and milestone evals
    # read and write: prepared shards (content-addressed; data/prepared keeps only the manifest), the eval
    # score cache. null: all of it stays under the local paths above (one machine).
    shared: str | None = None

    @field_validator("shared")
    @classmethod
    def _shared_is_a_uri(cls, value):
        if value is not None and "://" not in value:
            raise ValueError(f"must be a URI every node reaches, such as s3://bucket/prefix, got {value!r}")
        return value


class TokenizerParams(Section):
    kind: Literal["train", "pretrained"] = "train"
    vocab_size: int = Field(2048, ge=259)
    model_file: str | None = None
    train_sources: list[str] = Field(default_factory=list)
    max_sentences: int = Field(200_000, gt=0)

    @model_validator(mode="after")
    def _pretrained_needs_file(self):
        if self.kind == "pretrained" and not self.model_file:
            raise ValueError("tokenizer.model_file is required when tokenizer.kind is 'pretrained'")
        return self


class ModelParams(Section):
    preset: str = "tiny"
    overrides: dict = Field(default_factory=dict)

    def build_config(self, vocab_size: int | None = None) -> LlamaConfig:
        config = preset(self.preset).with_overrides(**self.overrides)
        if vocab_size is not None and vocab_size != config.vocab_size:
            config = config.with_overrides(vocab_size=vocab_size)
        return config

    @model_validator(mode="after")
    def _valid_architecture(self):
        self.build_config()
        return self


class SourceParams(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["slimpajama", "starcoderdata", "jsonl", "text", "builtin"]
    uri: str = ""
    weight: float = Field(gt=0)
    exclude_sets: list[str] = Field(default_factory=lambda: ["RedPajamaGithub"])
    languages: list[str] | None = None
    text_field: str | None = None     # None: "text" (JSON lines), "content" (starcoderdata Parquet)
    text_unit: Literal["paragraph", "line", "file"] = "paragraph"  # what one document is in a 'text' file
    builtin_part: Literal["text", "code"] | None = None

    @model_validator(mode="after")
    def _uri_or_builtin(self):
        if self.format == "builtin":
            if self.builtin_part is None:
                raise ValueError(f"data.sources[{self.name}].builtin_part is required for format 'builtin' "
                                 "(text or code)")
        elif not self.uri:
            raise ValueError(f"data.sources[{self.name}].uri is required for format '{self.format}'")
        return self


class BuiltinCorpusParams(Section):
    seed: int = 1234
    entities: int = Field(24, gt=0)
    programs: int = Field(1500, gt=0)


class DataParams(Section):
    seq_len: int = Field(256, gt=0)
    separator: Literal["bos", "eos", "both"] = "bos"
    val_fraction: float = Field(0.02, gt=0, lt=1)
    rows_per_shard: int = Field(8192, gt=0)
    row_group_rows: int = Field(1024, gt=0)
    # Tokenizer workers of `prepare` (Ray Data actors, one CPU each; not training workers): on the stage's own
    # Ray at most its CPUs, on a cluster (RAY_ADDRESS) what its autoscaled CPU group can hold.
    encode_processes: int = Field(2, gt=0, le=4096)
    # Custom Ray resources each of those workers asks for on top of its CPU, e.g. {"prepare": 1} to put them on
    # the autoscaled CPU group meant for them (infra/ray/cluster-16gpu.yaml, infra/kuberay/rayjob.yaml).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # For `tinyllama plan`'s prepare estimate: the corpus's tokens, what one prepare worker tokenizes per
    # CPU-second (the tokenizer, not the engine, sets it), and what the driver, one process whatever the
    # workers, handles per second: it receives and seals every token (phase 1), then packs every token into
    # the shards (phase 2). benchmarks/prepare.py measures the three; the stage prints the driver's two.
    corpus_tokens: int | str | None = None
    tokens_per_cpu_second: float = Field(850_000, gt=0)
    seal_tokens_per_second: float = Field(55_000_000, gt=0)
    pack_tokens_per_second: float = Field(30_000_000, gt=0)
    builtin: BuiltinCorpusParams = Field(default_factory=BuiltinCorpusParams)
    sources: list[SourceParams]

    @field_validator("corpus_tokens")
    @classmethod
    def _corpus_tokens(cls, value):
        return None if value is None else parse_tokens(value)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources):
        require_unique([s.name for s in sources], "source")
        if sum(s.weight for s in sources) <= 0:
            raise ValueError("source weights must sum to a positive number")
        return sources


class MeshParams(Section):
    """HSDP's 2-D device mesh: `shard` ranks (one node's GPUs) hold one copy of the state sharded between
    them; `replicate` such groups (the nodes) hold copies, averaging gradients once per step."""

    replicate: int = Field(..., gt=0)
    shard: int = Field(..., gt=0)


class TrainParams(Section):
    workers: int = Field(2, gt=0)            # Ray Train workers: one per GPU, or one CPU process each
    cpus_per_worker: int = Field(1, gt=0)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # FSDP2 on a 2-D mesh (HSDP), e.g. {replicate: 2, shard: 8} for 2 nodes × 8 GPUs: all-gathers stay within
    # a node; null: FSDP2 shards over every worker.
    mesh: MeshParams | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    threads_per_worker: int = Field(1, gt=0)
    micro_batch: int = Field(8, gt=0)
    global_batch_tokens: int = Field(..., gt=0)
    total_tokens: int | str
    milestones: list[int | str]
    lr: float = Field(4e-4, gt=0)
    min_lr: float = Field(4e-5, ge=0)
    warmup_steps: int = Field(2000, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    checkpoint_every_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every_steps: int = Field(10, gt=0)
    val_every_steps: int = Field(100, gt=0)
    val_batches: int = Field(4, gt=0)
    max_failures: int = Field(1, ge=0)
    eval_milestones_during_training: bool = True
    # Custom Ray resources each training worker needs on top of its CPUs/GPU, e.g. {"trainer": 1} to keep
    # training on the nodes meant for it (infra/ray/cluster-16gpu.yaml); milestone evals ask for eval.resources.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # How long to wait for the cluster to offer training + eval resources (an autoscaler may need minutes to
    # start nodes) before failing with what is missing. 0: they must be there already.
    resource_timeout_s: float = Field(0, ge=0)
    # Environment variables for every Ray worker (set in the job's runtime env, so nodes get them too),
    # e.g. TORCH_NCCL_ASYNC_ERROR_HANDLING.
    worker_env: dict[str, str] = Field(default_factory=dict)
    # Recompute each decoder block's activations in the backward pass instead of keeping them.
    activation_checkpointing: bool = False
    # CPU priority of those evals. idle: they run only on cycles training leaves unused (Linux
    # SCHED_IDLE, elsewhere nice 19), so they cannot slow it; normal: training's own priority.
    eval_priority: Literal["idle", "normal"] = "idle"
    # Ray Train's storage for resume checkpoints (a path or s3:// URI), deliberately outside the DVC
    # outputs: DVC deletes a stage's outputs before re-running it, which would defeat --resume auto.
    checkpoint_dir: str = "checkpoints/pretrain"

    @field_validator("total_tokens")
    @classmethod
    def _total(cls, value):
        return parse_tokens(value)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, values):
        tokens = [parse_tokens(v) for v in values]
        if not tokens:
            raise ValueError("at least one milestone is required")
        for a, b in zip(tokens, tokens[1:]):
            if b <= a:
                raise ValueError(f"milestones must increase: {format_tokens(b)} follows {format_tokens(a)}")
        return tokens

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.mesh is not None and self.strategy != "fsdp":
            raise ValueError(f"train.mesh: a device mesh needs train.strategy 'fsdp', got {self.strategy!r}")
        if self.mesh is not None and self.mesh.replicate * self.mesh.shard != self.workers:
            raise ValueError(f"train.mesh: replicate × shard = {self.mesh.replicate * self.mesh.shard} must equal "
                             f"train.workers ({self.workers})")
        if self.milestones[-1] > self.total_tokens:
            raise ValueError(f"train.milestones: last milestone {format_tokens(self.milestones[-1])} exceeds "
                             f"train.total_tokens {format_tokens(self.total_tokens)}")
        return self


class PlanParams(Section):
    """What one training worker achieves, for `tinyllama plan`: a GPU on a cluster (TinyLlama's anchor: 24k
    tok/s on an A100-40G, 312 TFLOP/s bf16), a `train.threads_per_worker`-thread CPU process on the tiny profile."""

    tokens_per_sec_per_worker: float = Field(24_000, gt=0)
    memory_per_worker_gb: float = Field(40, gt=0)
    peak_tflops_per_worker: float = Field(312, gt=0)


class EvalParams(Section):
    tasks: list[str]
    data_dir: str | None = None
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    device: str = "cpu"
    perplexity_rows: int = Field(256, gt=0)
    # What one milestone eval (a Ray task during pretraining) asks of the cluster, e.g. {"CPU": 8, "GPU": 1,
    # "evaluator": 1} for the eval node group of infra/ray/cluster-16gpu.yaml; checked with the training
    # workers' before training starts.
    resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    # How long the last training worker waits for the milestone evals still running when training ends;
    # what misses it, the evaluate stage scores.
    timeout_s: float = Field(3600, gt=0)

    @model_validator(mode="after")
    def _gpu_for_cuda(self):
        if self.device.startswith("cuda") and not self.resources.get("GPU"):
            raise ValueError(f"eval.resources: eval.device is {self.device!r}, so a milestone eval needs a GPU "
                             f"(add \"GPU\": 1), got {self.resources}")
        if self.resources.get("CPU", 0) < 1:
            raise ValueError(f"eval.resources: a milestone eval needs at least 1 CPU, got {self.resources}")
        return self




class QualityGate(Section):
    max_ppl_ratio: float | None = Field(None, gt=0)
    min_same_top: float | None = Field(None, ge=0, le=1)


class QuantizeParams(Section):
    """The `quantize` stage (tasks/quantize/): GGUF files for llama.cpp, int8 and bf16 for our engine, measured."""
    # A dir under paths.models ("pretrain/1M", "sft/<variant>"), any HF dir, or a registry ref
    # ("models:/tinyllama-chat@champion") once the alignment stages register chat variants.
    source: str = "models:/tinyllama-chat@champion"
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # file stem; default: from the source
    types: list[str] = Field(default_factory=lambda: list(GGUF_TYPES))
    int8: bool = True
    bf16: bool = False                       # our engine with bf16 weights: what `serve --dtype bf16` runs on GPUs
    val_rows: int = Field(64, gt=0)          # prepared val rows scored (one llama.cpp chunk each)
    evaluate: bool = True                    # the lm-eval average per type (eval.* settings)
    eval_limit: int | None = Field(None, gt=0)  # items per task for those averages; null: eval.limit
    threads: int = Field(2, gt=0)
    overwrite: bool = False
    registered_model: str = "tinyllama-chat-gguf"
    gates: dict[str, QualityGate] = Field(default_factory=lambda: {
        "Q8_0": QualityGate(max_ppl_ratio=1.005, min_same_top=0.98)})

    @field_validator("types")
    @classmethod
    def _known_types(cls, types):
        for name in types:
            if name not in GGUF_TYPES:
                raise ValueError(f"unknown quant type {name!r} (known: {', '.join(GGUF_TYPES)})")
        if len(set(types)) != len(types):
            raise ValueError("a quant type is listed twice")
        return types

    @property
    def ours(self) -> list[str]:
        """Our engine's variants this stage measures besides fp32 (the reference), in the report's order."""
        return [name for name, measured in (("bf16", self.bf16), ("int8", self.int8)) if measured]

    @model_validator(mode="after")
    def _gated_types_are_built(self):
        built = set(self.types) | set(self.ours)
        for name in self.gates:
            if name not in built:
                raise ValueError(f"quantize.gates.{name}: not a type this stage builds ({', '.join(sorted(built))})")
        return self


SFT_FORMATS = ("messages", "alpaca", "oasst", "builtin")
PREFERENCE_FORMATS = ("preference", "builtin")


class ChatSourceParams(Section):
    """Chat data: `messages` ({"messages": [...]} rows, UltraChat-200k's layout), `alpaca`
    ({"instruction", "input", "output"}), `oasst` (OpenAssistant message trees, flattened to the
    best-ranked path), `preference` ({"prompt", "chosen", "rejected"}, UltraFeedback-binarized's
    layout) or `builtin` (generated from the embedded world, `data.builtin`). `uri`: a file, glob or
    directory of .jsonl/.json/.parquet (.gz/.zst), local, `s3://` or `hf://datasets/...`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["messages", "alpaca", "oasst", "preference", "builtin"]
    uri: str = ""
    limit: int | None = Field(None, gt=0)  # read only the first N rows

    @model_validator(mode="after")
    def _uri_or_builtin(self):
        if self.format != "builtin" and not self.uri:
            raise ValueError(f"uri is required for format '{self.format}' (source {self.name})")
        return self


def _chat_sources(sources: list[ChatSourceParams], formats: tuple[str, ...], what: str) -> list[ChatSourceParams]:
    """Named uniquely, and each of a format that holds `what` (SFT conversations, preference pairs)."""
    require_unique([s.name for s in sources], "source")
    for source in sources:
        if source.format not in formats:
            raise ValueError(f"source {source.name}: format {source.format!r} is not {what} "
                             f"(use one of {', '.join(formats)})")
    return sources


class ScheduleParams(Section):
    """One optimisation recipe (TRL's names): epochs over the data, peak lr, warmup as a fraction of
    the steps, then `schedule` down to `min_lr`; `batch_size` sequences (DPO: pairs) per step,
    `micro_batch` of them per worker per micro step (accumulation is derived)."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, gt=0)
    micro_batch: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _min_below_peak(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class DpoRecipe(ScheduleParams):
    """The DPO optimisation recipe (TRL's names): what a DPO worker reads, typed."""

    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # sigmoid only: conservative DPO (cDPO)
    rpo_alpha: float = Field(0.0, ge=0)  # TRL's rpo_alpha: + α × NLL of the chosen answers (RPO)
    lr: float = Field(5e-7, gt=0)

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {self.loss_type!r}")
        return self


class DpoParams(DpoRecipe):
    """A variant's `dpo` section: its recipe and its preference data."""

    sources: list[ChatSourceParams]

    @field_validator("sources")
    @classmethod
    def _sources(cls, sources):
        return _chat_sources(sources, PREFERENCE_FORMATS, "preference data")


class VariantParams(ScheduleParams):
    """One chat model: SFT of a pretraining milestone (`base`, a milestone name such as `1M` or `3T`;
    its checkpoint must exist when the sft stage runs), then DPO from that SFT result when `dpo` is set."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str
    template: str = "zephyr"
    sources: list[ChatSourceParams]
    max_length: int = Field(2048, gt=1)
    packing: bool = True
    overlong: Literal["truncate", "drop"] = "drop"
    val_fraction: float = Field(0.05, ge=0, lt=1)
    dpo: DpoParams | None = None

    @field_validator("template")
    @classmethod
    def _known_template(cls, name):
        from model.chat import TEMPLATES

        if name not in TEMPLATES:
            raise ValueError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
        return name

    @field_validator("base")
    @classmethod
    def _base_is_a_token_count(cls, base):
        return format_tokens(parse_tokens(base))

    @field_validator("sources")
    @classmethod
    def _sources(cls, sources):
        return _chat_sources(sources, SFT_FORMATS, "SFT data")


class ChatEvalParams(Section):
    """The held-out chat accuracy: greedy answers to questions whose gold answer they must contain.
    `builtin`: questions about the embedded world that no SFT or DPO example asks; else a JSON lines
    file of {"messages": [... ending with a user turn], "answer": str}."""

    source: str = "builtin"
    limit: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(48, gt=0)


class SftParams(Section):
    max_bad_fraction: float = Field(0.05, ge=0, le=1)  # of a source's rows, before training
    registered_model: str = Field("tinyllama-chat", pattern=r"^[A-Za-z0-9_.-]+$")
    chat_eval: ChatEvalParams = Field(default_factory=ChatEvalParams)
    checkpoint_dir: str = "checkpoints/sft"  # resume checkpoints (Ray Train storage), outside DVC outputs
    variants: list[VariantParams]

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, variants):
        require_unique([v.name for v in variants], "variant")
        return variants


class MlflowParams(Section):
    tracking_uri: str | None = None
    experiment: str = "tinyllama-tiny"


class DeployGate(Section):
    """The deploy stage's gate (tasks/deploy/gate.py): lm-eval through the API against in-process scoring."""

    items: int = Field(8, ge=1)                  # the first N items of each eval.tasks task, scored both ways
    tolerance: float = Field(1e-3, gt=0, le=1)   # the largest allowed |served - in-process| log-likelihood


class DeployParams(Section):
    """The served model and how it is served (tasks/deploy/, serving/app.py ServeArgs)."""

    model: str | None = None            # a model dir or models:/NAME@ALIAS; null: the last pretrain milestone
    draft: str | None = None            # a draft model dir, or "prompt-lookup"
    draft_tokens: int = Field(4, ge=1, le=16)
    quant: Literal["none", "int8"] = "none"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = None
    num_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)  # above num_replicas: Serve autoscales between the two
    cpus_per_replica: int = Field(2, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: each replica asks Ray for one GPU (checked where it serves)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # The compiled decode step (model/step.py), compiled when a replica loads: on for GPU replicas, off for the
    # tiny CPU profile, whose compile (~2 min on 2 cores) would cost more than it saves in the DAG.
    compile: bool = False
    slots: int = Field(8, ge=1)
    max_waiting: int = Field(64, ge=0)
    stream_interval: int = Field(1, ge=1)          # tokens per streamed chunk after the first (vLLM's option)
    prompt_cache: bool = True                      # reuse a free slot's KV for a shared prompt prefix
    max_queued_requests: int = Field(16, ge=0)     # requests Serve's proxy holds for busy replicas before 429
    retry_after_s: int = Field(1, ge=1)            # Retry-After of every 429
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies: 413
    max_prompt_tokens: int | None = Field(None, ge=1)  # null: the model's context less one token
    max_stop_chars: int = Field(64, ge=1)          # the length of each stop string
    max_top_logprobs: int = Field(20, ge=0)        # the most top_logprobs a request may ask
    check_max_tokens: int = Field(32, ge=1)
    gate: DeployGate = Field(default_factory=DeployGate)

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas < self.num_replicas:
            raise ValueError(f"deploy.max_replicas ({self.max_replicas}) is below deploy.num_replicas "
                             f"({self.num_replicas})")
        if not self.api_key_env and not is_loopback(self.host):
            raise ValueError(f"deploy.api_key_env: required when deploy.host ({self.host}) is not a loopback address; "
                             "a server others can reach must check a key")
        return self


class Params(Section):
    profile: str = "tiny"
    seed: int = 1337
    paths: Paths = Field(default_factory=Paths)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams
    train: TrainParams
    plan: PlanParams = Field(default_factory=PlanParams)
    eval: EvalParams
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    sft: SftParams | None = None
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    deploy: DeployParams = Field(default_factory=DeployParams)

    @model_validator(mode="after")
    def _cross_section(self):
        config = self.model.build_config(self.tokenizer.vocab_size if self.tokenizer.kind == "train" else None)
        if self.data.seq_len > config.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds the model's max_seq_len "
                             f"({config.max_seq_len})")
        per_step = self.train.workers * self.train.micro_batch * self.data.seq_len
        if self.train.global_batch_tokens % per_step:
            raise ValueError(f"train.global_batch_tokens ({self.train.global_batch_tokens}) is not divisible by "
                             f"workers × micro_batch × seq_len = {self.train.workers} × {self.train.micro_batch} × "
                             f"{self.data.seq_len} = {per_step}")
        names = {s.name for s in self.data.sources}
        for name in self.tokenizer.train_sources:
            if name not in names:
                raise ValueError(f"tokenizer.train_sources: {name!r} is not a data.sources name "
                                 f"({', '.join(sorted(names))})")
        if self.sft is not None:
            self._check_variants(config)
        return self

    def _check_variants(self, config: LlamaConfig) -> None:
        """A variant's base milestone is checked when the sft stage runs (it must exist on disk), not
        here: a profile whose milestones change must still validate for the stages before sft."""
        for variant in self.sft.variants:
            where = f"sft.variants[{variant.name}]"
            if variant.max_length > config.max_seq_len:
                raise ValueError(f"{where}.max_length ({variant.max_length}) exceeds the model's max_seq_len "
                                 f"({config.max_seq_len})")
            for recipe, field in ((variant, where), (variant.dpo, f"{where}.dpo")):
                if recipe is None:
                    continue
                per_step = self.train.workers * recipe.micro_batch
                if recipe.batch_size % per_step:
                    raise ValueError(f"{field}.batch_size ({recipe.batch_size}) is not divisible by train.workers × "
                                     f"micro_batch = {self.train.workers} × {recipe.micro_batch} = {per_step}")

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        """The architecture; `vocab_size` from the prepared tokenizer wins over the preset's."""
        if vocab_size is None and self.tokenizer.kind == "train":
            vocab_size = self.tokenizer.vocab_size
        return self.model.build_config(vocab_size)

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_tokens // (self.train.workers * self.train.micro_batch * self.data.seq_len)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "params"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
    return f"{where}: {message}{shown}"


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise UserError(f"{source}: {len(problems)} invalid field(s): " + "; ".join(problems)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--params: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, str(path))


def add_params_argument(parser) -> None:
    """Every stage takes `--params FILE` (default params.yaml), as dvc.yaml calls it."""
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="the profile to run (default: params.yaml)")
