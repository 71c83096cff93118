"""Shared pytest fixtures (append yours; keep each one documented)."""

import os
import signal
from contextlib import contextmanager

import pytest

# Offline, as every run must be: a test that reaches for a hub (transformers, datasets, lm-eval) fails
# instead of downloading. Set here, before any test module imports those libraries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Ray binds its console handlers ("ray", "ray.data") to sys.stderr when first imported. Imported inside a test
# that captures with capsys, that stream is closed when the test ends (the stages' logs restore those handlers),
# and a record Ray logs later (a Ray Data prefetch thread exiting after its stage) prints "--- Logging error ---"
# into whichever test runs then: a bad-input test's one-line stderr failed so. Imported here, at collection,
# they hold pytest's session-long capture instead.
import ray  # noqa: E402, F401, I001
import ray.data  # noqa: E402, F401


@contextmanager
def time_limit(seconds: float, what: str):
    """A time limit for a long fixture: pytest-timeout limits test bodies only (pyproject.toml), so a
    fixture that could hang bounds itself with this; on expiry it fails (every test that needs it errors)."""
    def expire(signum, frame):
        pytest.fail(f"{what}: still running after {seconds:.0f} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- S3 (moto's server on 127.0.0.1)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 and a free port, for the whole session;
    returns its endpoint URL. Buckets persist across tests: use a unique bucket name per test.
    Point clients at it with the `s3_env` fixture (what a user sets for real S3, minus the fake
    credentials) or pass the URL explicitly (`endpointurl` for DVC, `client_kwargs` for s3fs)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


def point_at_s3(monkeypatch, endpoint: str) -> None:
    """Send boto3, s3fs and DVC subprocesses to `endpoint`: AWS_ENDPOINT_URL plus fake credentials (through
    `monkeypatch`, so they are undone with it). Clears s3fs's cached filesystems so none points elsewhere."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for name, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The moto server for one test (`point_at_s3`); yields its endpoint URL."""
    import s3fs

    point_at_s3(monkeypatch, s3_server)
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------- a small trained tokenizer


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory):
    """A real Llama-2-style tokenizer dir (SentencePiece BPE, vocab 512, ~0.2 s to train) fitted
    to the SlimPajama/Starcoderdata-like fixture text of tests/data_fixtures.py. Copy it into a
    test's `{paths.models}/tokenizer` rather than writing into it."""
    import random

    from data_fixtures import document, program

    from model.tokenizer import save_tokenizer_dir, train_sentencepiece

    rng = random.Random(0)
    texts = [document(rng) for _ in range(300)]
    texts += [program(rng, language, i) for i in range(100) for language in ("python", "rust", "javascript")]
    texts.append("def f(): return '{}[]<>|\\\\/\"#@$%^&*~`!?;:+-=_0123456789 zqxgithubmarkerzqx'")
    model = train_sentencepiece(texts, vocab_size=512, max_sentences=100_000)
    return save_tokenizer_dir(model, tmp_path_factory.mktemp("tokenizer") / "tokenizer")


# ---------------------------------------------------------------- prepared data + params for pretraining


def write_prepared(data_dir, tokenizer_dir, sources: dict, seq_len: int, vocab_size: int,
                   train_rows: int, val_rows: int, rows_per_shard: int, seed: int = 0) -> dict:
    """A `{paths.data}/prepared` dir exactly as docs/CONTRACTS.md specifies (manifest.json + Parquet
    shards of uint16 rows), without running a tokenizer. `sources` maps a name to a stride: each row
    is an arithmetic sequence `start, start+stride, ...` mod vocab, so a model can visibly learn it.
    `tokenizer_dir` gets stand-in tokenizer files; the manifest carries their tokenizer.model sha256."""
    import hashlib
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.model").write_bytes(rng.bytes(256))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tokenizer_dir / name).write_text("{}")
    prepared = data_dir / "prepared"
    manifest = {"version": 1, "seq_len": seq_len, "row_len": seq_len + 1, "vocab_size": vocab_size, "dtype": "uint16",
                "separator": "bos", "sources": {},
                "tokenizer_sha256": hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()}
    for name, stride in sources.items():
        entry = {"format": "builtin", "inputs": {}, "splits": {}, "skipped": {}}
        for split, n in (("train", train_rows), ("val", val_rows)):
            starts = rng.choice(vocab_size, size=(n, 1), replace=n > vocab_size)  # distinct rows when possible
            rows = ((starts + stride * np.arange(seq_len + 1)) % vocab_size).astype(np.uint16)
            shards = []
            for index, first in enumerate(range(0, n, rows_per_shard)):
                chunk = rows[first:first + rows_per_shard]
                relative = f"{name}/{split}/shard-{index:05d}.parquet"
                (prepared / relative).parent.mkdir(parents=True, exist_ok=True)
                offsets = pa.array(np.arange(0, (len(chunk) + 1) * (seq_len + 1), seq_len + 1, dtype=np.int32))
                table = pa.table({"tokens": pa.ListArray.from_arrays(offsets, pa.array(chunk.reshape(-1)))})
                pq.write_table(table, prepared / relative)
                shards.append(relative)
            entry["splits"][split] = {"rows": n, "tokens": n * seq_len, "documents": n, "shards": shards}
        manifest["sources"][name] = entry
    (prepared / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def pretrain_params(root, **train_overrides):
    """The tiny profile shrunk for tests: micro model, seq 64, 2 workers × 4 rows × 2 accumulation
    (1024 tokens per step), 24 steps, milestones at steps 5 and 24, everything under `root`."""
    from pathlib import Path

    import yaml

    from tasks.params import parse_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models"), "metrics": str(root / "metrics")}
    raw["tokenizer"]["vocab_size"] = 512
    raw["model"] = {"preset": "micro", "overrides": {}}
    raw["data"]["seq_len"] = 64
    raw["data"]["sources"] = [{"name": "alpha", "format": "builtin", "builtin_part": "text", "weight": 0.7},
                              {"name": "beta", "format": "builtin", "builtin_part": "code", "weight": 0.3}]
    raw.pop("sft")  # its variants name the tiny profile's milestones; tests that align add their own
    raw["tokenizer"]["train_sources"] = ["alpha", "beta"]
    raw["train"].update(workers=2, micro_batch=4, global_batch_tokens=1024, total_tokens=24 * 1024,
                        milestones=[5 * 1024, 24 * 1024], lr=3e-3, min_lr=3e-4, warmup_steps=3,
                        checkpoint_every_steps=6, keep_checkpoints=2, log_every_steps=4, val_every_steps=8,
                        val_batches=2, max_failures=1, eval_milestones_during_training=False,
                        checkpoint_dir=str(root / "checkpoints"))
    raw["train"].update(train_overrides)
    return parse_params(raw, "test params")


@pytest.fixture
def pretrain_workspace(tmp_path):
    """(params, root): test params (see `pretrain_params`) plus their prepared data and tokenizer dir."""
    params = pretrain_params(tmp_path)
    write_prepared(tmp_path / "data", tmp_path / "models" / "tokenizer", {"alpha": 1, "beta": 3},
                   seq_len=64, vocab_size=512, train_rows=300, val_rows=40, rows_per_shard=128)
    return params, tmp_path


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for one test module (own temp dir, no dashboard), shut down after it.
    Stages' `ensure_ray` reuses it. Ray Train's controller polls every 0.2 s instead of 2 s so each
    `ray.train.report` barrier is short, and prints are not duplicated by Train's print patch."""
    import os
    import shutil
    import tempfile

    import ray

    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    temp_dir = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def train_worker_processes():
    """Ray Train's worker processes among this test process's descendants (Ray titles them
    `ray::RayTrainWorker...`), the shared pipeline run's excepted: what a fault-tolerance test SIGKILLs."""
    import psutil
    from pipeline_repo import background_pids

    found, shared_run = [], background_pids()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in shared_run and "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited (or a zombie) while we looked
            continue
    return found


# ---------------------------------------------------------------- evaluation: items and micro models


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: the machine's 2 cores are shared, extra threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_models(small_tokenizer_dir):
    """Eval items (tests/eval_fixtures.py) plus two micro Llamas over `small_tokenizer_dir`: one
    trained on the items' answers (scores ~1.0) and one random (~chance). Trained once per session
    (~10 s, one thread); write them out with `eval_fixtures.write_checkpoint`, never mutate them."""
    import torch
    from eval_fixtures import eval_items, fact_texts, random_model, trained_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    try:
        items = eval_items()
        trained = trained_model(small_tokenizer_dir, fact_texts(items))
    finally:
        torch.set_num_threads(threads)
    vocab = trained.config.vocab_size
    return {"items": items, "trained": trained, "random": random_model(vocab, seed=1),
            "tokenizer_dir": small_tokenizer_dir}


# ---------------------------------------------------------------- the real tiny pipeline, run once


PIPELINE_FIXTURE = "pipeline_repo"
# The shared run yields the CPU to the tests beside it: they are the session's critical path once it is
# under way, and it fills the CPU their server start-ups and waits leave idle. Whole suite, 2-core AMD
# EPYC: 1,827 s at an equal share, 1,680 s at nice 10 (the run itself 19.6 -> 20.6 min).
BACKGROUND_NICENESS = 10


def _uses_the_pipeline(item) -> bool:
    return PIPELINE_FIXTURE in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Modules with a test of the shared pipeline run go last, each whole and in order: the run starts in
    the background with the session (`pipeline_in_background`) and the other tests go on beside it, using
    the CPU its start-ups and waits leave idle, instead of everything waiting ~12 minutes for it first.
    Whole modules, not single tests: their other tests (a killed `dvc repro`, servers starting) then use
    the CPU left idle after the run, not the CPU the run needs (moved beside it, that `dvc repro` test took
    215 s instead of 113-127 and the suite 31.5 minutes), and a module's fixtures are made once."""
    late = {item.nodeid.split("::")[0] for item in items if _uses_the_pipeline(item)}
    items[:] = sorted(items, key=lambda item: item.nodeid.split("::")[0] in late)


@pytest.fixture(scope="session", autouse=True)
def pipeline_in_background(request, tmp_path_factory):
    """Starts the shared pipeline run (`pipeline_repo`) in a clean copy of this repo as the session's
    first test starts, when a selected test needs it; ends it if the session ends first. Its model cache
    (`TINYLLAMA_MODEL_CACHE`) is its own: tests running beside it register and fetch models of the same names."""
    from pipeline_repo import fresh_copy, start_flow, stop_flow

    if os.environ.get("TINYLLAMA_PIPELINE_REPO") or not any(map(_uses_the_pipeline, request.session.items)):
        yield None
        return
    base = tmp_path_factory.mktemp("pipeline")
    flow = start_flow(fresh_copy(base / "repo"), niceness=BACKGROUND_NICENESS,
                      TINYLLAMA_MODEL_CACHE=str(base / "model-cache"))
    yield flow
    stop_flow(flow)


@pytest.fixture(scope="session")
def pipeline_repo(pipeline_in_background):
    """A clean copy of this repo (tests/pipeline_repo.py) after one full run of the tiny profile the
    way `make run` does it (the Prefect flow over dvc.yaml), its results committed like a user would.
    The run starts with the session (`pipeline_in_background`); this waits for it. Shared by the slow
    end-to-end tests: copy it (`pipeline_repo.clone_workspace`) before changing anything.
    `.stage_seconds` has the timings, `.output` what the run printed.
    TINYLLAMA_PIPELINE_REPO=<dir> reuses such a copy instead of running the pipeline again."""
    from pathlib import Path

    from pipeline_repo import FLOW_OUTPUT, PipelineRun, finish_flow, git

    if os.environ.get("TINYLLAMA_PIPELINE_REPO"):  # reuse a finished, committed run while iterating on these tests
        root = Path(os.environ["TINYLLAMA_PIPELINE_REPO"]).resolve()
        return PipelineRun(root, output=(root / FLOW_OUTPUT).read_text())
    run = finish_flow(pipeline_in_background)
    print(f"\ntiny pipeline: {run.total_seconds} s since the session started, per stage {run.stage_seconds}")
    git(run.root, "add", "-A")
    git(run.root, "commit", "-q", "-m", "tiny pipeline run")
    return run


# ---------------------------------------------------------------- one torch thread for tiny models


@pytest.fixture(scope="module")
def single_thread():
    """torch on one intra-op thread for the module, restored after. Tiny models gain nothing from
    threads, and on a shared, oversubscribed machine OpenMP's barriers make each small op wait for a
    descheduled sibling thread: the decoding tests ran ~10× faster this way under load.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- random micro target and draft


@pytest.fixture(scope="module")
def target():
    """A random micro Llama (seed 10) in eval mode, the target of the decoding tests
    (tests/test_generate.py, tests/test_serving_math.py); one per module, never mutate it."""
    import torch

    from model.config import micro
    from model.llama import Llama

    torch.manual_seed(10)
    return Llama(micro()).eval()


@pytest.fixture(scope="module")
def draft():
    """A smaller random micro Llama (seed 11, one layer, same vocabulary) in eval mode: the draft
    model speculative decoding pairs with `target`; one per module, never mutate it."""
    import torch

    from model.config import micro
    from model.llama import Llama

    torch.manual_seed(11)
    return Llama(micro().with_overrides(n_layer=1, dim=32, n_head=2, n_kv_head=1, mlp_dim=64)).eval()


# ---------------------------------------------------------------- a servable chat model dir


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory, small_tokenizer_dir):
    """A HF Llama dir as the pipeline's chat variants look: random micro weights (context 256),
    the small tokenizer, the zephyr chat template in tokenizer_config.json, and config.json
    `tinyllama` metadata naming a base milestone. What the serving tests serve."""
    import json

    import torch

    from model.chat import template
    from model.config import micro
    from model.hf import save_hf
    from model.llama import Llama

    torch.manual_seed(21)
    out = tmp_path_factory.mktemp("served") / "chat-model"
    save_hf(Llama(micro().with_overrides(max_seq_len=256)), out, tokenizer_dir=small_tokenizer_dir,
            metadata={"base_milestone": "1M", "variant": "test"})
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template("zephyr").source
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def local(served_model_dir):
    """The served weights and tokenizer in this process (one torch thread: the server has the cores): what
    the serving tests compute the server's answers from."""
    import torch

    from model.hf import load_hf
    from model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    return load_hf(served_model_dir), Tokenizer.load(served_model_dir)
