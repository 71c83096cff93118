"""`tinyllama serve`: the OpenAI-compatible server on a local Ray, until Ctrl-C or SIGTERM.

The same application `serve deploy CONFIG` runs on a cluster (serving/app.py `build_app`), started
here with Ray sized to `--cpus` and Serve's proxy on `--host`/`--port` (127.0.0.1 by default: a
server is only reachable from elsewhere when asked, and then only with `--api-key-env`).
"""

from __future__ import annotations

import importlib.util
import signal
import threading

from model.devices import check_device
from serving.auth import is_loopback
from tasks.deploy.champion import served_ref
from tasks.errors import UserError

PROMPT_LOOKUP = "prompt-lookup"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS|URI",
                        help="a HF Llama dir, a registry reference (resolved through MLflow), or a dir the flow "
                             "published on shared storage (s3://.../serving/<sha256>/<name>: fetched by the replica)")
    parser.add_argument("--draft", default=None, metavar=f"DIR|{PROMPT_LOOKUP}",
                        help="speculative decoding: a smaller model dir with the same vocabulary, or prompt lookup")
    parser.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens drafted per step")
    parser.add_argument("--quant", choices=("none", "int8"), default="none", help="int8 matmuls (model/quant.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="require 'Authorization: Bearer $VAR' on /v1 routes")
    parser.add_argument("--name", default=None, help="the model id clients send (default: registry or dir name)")
    parser.add_argument("--slots", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--max-waiting", type=int, default=64, help="queued sequences before 429")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and the replica's torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the replica decodes (cuda: it asks Ray for one GPU)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights and activations")
    parser.add_argument("--compile", action="store_true",
                        help="decode on the compiled step (model/step.py), compiled at load (on 2 CPU cores "
                             "~10-25 s with a cold inductor cache); 1.3-2x the eager rate at batch 1 on CPU")
    parser.add_argument("--stream-interval", type=int, default=1, metavar="N",
                        help="tokens per streamed chunk after the first (larger: less overhead per token)")
    parser.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                        help="prefill every prompt whole (default: a prefix a free slot holds is reused)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ references")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus metrics (Ray's, Serve's and the server's) at this port's /metrics")
    limits = parser.add_argument_group("limits (default: the application's, as in params.yaml's deploy:)")
    for flag, metavar, what in LIMIT_FLAGS:
        limits.add_argument(flag, type=int, default=None, metavar=metavar, help=what)


LIMIT_FLAGS = [
    ("--max-queued-requests", "N", "requests Serve's proxy holds while the replica is busy, then 429"),
    ("--retry-after-s", "S", "the Retry-After seconds of every 429"),
    ("--max-body-bytes", "N", "larger request bodies get 413"),
    ("--max-prompt-tokens", "N", "longer prompts get 400 (default: the context less one token)"),
    ("--max-stop-chars", "N", "the longest stop string accepted"),
    ("--max-top-logprobs", "N", "the most top_logprobs a request may ask"),
]


def serve_args(args) -> dict:
    """The Serve application args (serving.app.ServeArgs) these flags mean; bad values name the flag."""
    from serving.app import parse_args

    if not args.api_key_env and not is_loopback(args.host):
        raise UserError(f"--api-key-env: required with --host {args.host} (not a loopback address): a server "
                        "others can reach must check a key")
    draft = args.draft
    if draft and draft != PROMPT_LOOKUP:
        draft = served_ref(draft, args.tracking_uri, "--draft")
    values = {"model": served_ref(args.model, args.tracking_uri, "--model"), "name": args.name, "draft": draft,
              "draft_tokens": args.draft_tokens, "quant": args.quant, "api_key_env": args.api_key_env,
              "slots": args.slots, "max_waiting": args.max_waiting, "cpus": args.cpus,
              "stream_interval": args.stream_interval, "device": args.device, "dtype": args.dtype,
              "compile": args.compile, "prompt_cache": args.prompt_cache}
    for flag, _, _ in LIMIT_FLAGS:
        field = flag.removeprefix("--").replace("-", "_")
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    try:
        check_device(args.device, "--device")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.quant == "int8" and importlib.util.find_spec("model.quant") is None:
        raise UserError("--quant: int8 needs model/quant.py (the quantization work), which this build lacks")
    try:
        parse_args(values)
    except ValueError as exc:
        flag = str(exc).split(":")[0].removeprefix("serve args.").replace("_", "-")
        raise UserError(f"--{flag}: {str(exc).split(': ', 1)[1]}") from None
    return values


def main(args) -> int:
    import os

    from ray import serve

    from serving.app import build_app
    from tasks.deploy.ray_serve import APPLICATION, serve_session, wait_healthy

    values = serve_args(args)
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise UserError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    url = f"http://{args.host}:{args.port}"
    with serve_session(args.cpus, args.host, args.port, metrics_port=args.metrics_port) as ray_dir:
        if ray_dir:
            print(f"Ray and replica logs: {ray_dir}/session_latest/logs", flush=True)
        try:
            serve.run(build_app(values), name=APPLICATION, route_prefix="/")
            seconds = wait_healthy(f"{url}/health", timeout=600)
        except (RuntimeError, TimeoutError) as exc:
            raise UserError(f"--model: the server did not come up: {exc}") from None
        print(f"serving {values['model']} at {url}/v1 (ready in {seconds:.1f} s); Ctrl-C or SIGTERM stops it",
              flush=True)
        stop.wait()
        print("stopping", flush=True)
    return 0
