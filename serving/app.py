"""The Ray Serve application: an OpenAI-compatible FastAPI app over our own engine.

`build_app(args)` is the application builder Ray Serve's own tooling imports: a Serve config with
`import_path: serving.app:build_app` and `args:` (the fields of `ServeArgs`) is what
`serve deploy CONFIG` / `serve run CONFIG` and a KubeRay RayService run, and what `tinyllama serve`
runs locally. (`ray.serve.llm` needs vLLM and GPUs; on CPU we serve model/'s engine.)

A replica loads its model in a background thread, so `/health` can answer 503 while it loads and
200 once it serves; a load that fails makes Serve's health check fail with the reason. With
`api_key_env` set, every /v1 route needs `Authorization: Bearer <the key in that variable>`; the
key is read from the replica's environment and never logged (serving/auth.py).

Overload is refused at every layer, with 429 and `Retry-After`: Serve's proxy past
`max_queued_requests` waiting for a replica (its backpressure), the engine past `max_waiting`
sequences. An engine thread that dies makes the health check fail, so Serve replaces the replica;
the ASGI lifespan's shutdown (which Serve runs when it stops a replica) ends the engine.
"""


import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.responses import JSONResponse

from serving import auth, faults, replica
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits, validation_error

logger = logging.getLogger("tinyllama.serving")
DEPLOYMENT = "tinyllama"
ONGOING_MARGIN = 8  # requests past slots + queue that Serve still forwards (health checks, model lists)


class ServeArgs(BaseModel):
    """What a replica serves and how; the `args:` of a Serve config."""

    model_config = ConfigDict(extra="forbid")
    model: str                                   # a HF Llama dir, or one published on shared storage (s3://...)
    name: str | None = None                      # the model id clients send; default: registry name or dir name
    draft: str | None = None                     # a draft model dir, or "prompt-lookup"
    draft_tokens: int = Field(4, ge=1, le=16)
    quant: Literal["none", "int8"] = "none"
    api_key_env: str | None = None               # env var holding the bearer key; unset: no auth
    slots: int = Field(8, ge=1)                  # sequences decoding together
    max_waiting: int = Field(64, ge=0)           # sequences queued for a slot before 429
    prefill_chunk: int = Field(128, ge=1)        # prompt tokens prefilled per step
    stream_interval: int = Field(1, ge=1)        # tokens per streamed chunk after the first
    prompt_cache: bool = True                    # reuse a free slot's KV for a shared prompt prefix
    cpus: int = Field(1, ge=1)                   # the replica's CPUs, and its torch threads
    device: Literal["cpu", "cuda"] = "cpu"       # cuda: the replica asks Serve for a GPU (num_gpus 1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False                        # the compiled decode step (model/step.py), compiled at load
    lineage_file: str | None = None              # the deploy stage's lineage.json (a path or a URI)
    max_body_bytes: int = Field(Limits.max_body_bytes, ge=1024)            # larger request bodies: 413
    max_prompt_tokens: int | None = Field(Limits.max_prompt_tokens, ge=1)  # None: the context less one
    max_stop_chars: int = Field(Limits.max_stop_chars, ge=1)               # per stop string
    max_top_logprobs: int = Field(Limits.max_top_logprobs, ge=0)
    max_queued_requests: int = Field(16, ge=0)   # requests Serve's proxy holds for a busy replica before 429
    retry_after_s: int = Field(Limits.retry_after_s, ge=1)                 # Retry-After of every 429

    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_prompt_tokens, self.max_stop_chars, self.max_top_logprobs,
                      self.retry_after_s)

    def max_ongoing_requests(self) -> int:
        return self.slots + self.max_waiting + ONGOING_MARGIN

    def backpressure(self) -> dict:
        """Serve's answer past `max_queued_requests` (its default is a 503 without Retry-After)."""
        return {"status_code": 429, "retry_after_s": self.retry_after_s}


def parse_args(args: dict) -> ServeArgs:
    try:
        return ServeArgs(**args)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"serve args.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    await asyncio.to_thread(replica.shutdown)  # the engine's last step may take a moment


api = FastAPI(title="tinyllama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    error = validation_error(list(exc.errors()))
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception):
    logger.exception("request failed")  # the reason is for the replica's log, not for clients
    return JSONResponse(APIError(500, "internal error").body(), status_code=500)


class _BodyLimit:
    """A request body above `max_body_bytes` is a 413 before it is parsed: at once when its
    Content-Length says so, else as soon as the streamed body passes the limit (it is never read whole)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = replica.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send) -> None:
        error = APIError(413, f"request body larger than this server's limit of {limit} bytes", None,
                         "request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


api.add_middleware(_BodyLimit)


@api.middleware("http")
async def _authorize(request: Request, call_next):
    if request.url.path.startswith("/v1") and not auth.allowed(request.headers.get("authorization", "")):
        error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
        return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


@serve.deployment(name=DEPLOYMENT, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, args: dict):
        self.args = parse_args(args)
        self.service = None
        self.load_error: str | None = None
        if self.args.api_key_env:
            key = os.environ.get(self.args.api_key_env)
            if not key:
                raise ValueError(f"api_key_env: environment variable {self.args.api_key_env} is not set "
                                 "in the replica's environment")
            auth.require(key)
        replica.configure(self.args.limits())
        threading.Thread(target=self._load, name="tinyllama-load", daemon=True).start()

    def _load(self) -> None:
        import torch

        from model.decoder import BatchDecoder
        from serving.api import OpenAIService
        from serving.engine import Engine
        from serving.loader import load
        from serving.metrics import serve_observer

        try:
            torch.set_num_threads(self.args.cpus)
            served = load(self.args.model, self.args.name, self.args.draft, self.args.quant, self.args.lineage_file,
                          self.args.device, self.args.dtype)
            if self.args.max_prompt_tokens is not None and self.args.max_prompt_tokens >= served.context:
                raise ValueError(f"max_prompt_tokens: {self.args.max_prompt_tokens} leaves no room for an answer "
                                 f"in the model's context of {served.context} tokens")
            start = time.monotonic()
            decoder = BatchDecoder(served.model, self.args.slots, prefill_chunk=self.args.prefill_chunk,
                                   draft=served.draft, k=self.args.draft_tokens, compile=self.args.compile,
                                   prompt_cache=self.args.prompt_cache)
            decoder.step = faults.faulty_step(decoder.step)
            engine = Engine(decoder, self.args.max_waiting, self.args.cpus, serve_observer(decoder))
            service = OpenAIService(served, engine, self.args.stream_interval, self.args.limits())
            replica.opened(service)
            self.service = service
            logger.info("serving %s from %s (%d slots, %s %s, %s in %.1f s)", served.name, served.directory,
                        self.args.slots, self.args.device, self.args.dtype,
                        "compiled" if self.args.compile else "eager", time.monotonic() - start)
        except Exception as exc:
            self.load_error = f"loading {self.args.model} failed: {exc}"
            logger.error(self.load_error)

    def check_health(self) -> None:
        """Serve's periodic check: a failed load or a dead engine thread makes Serve replace the replica."""
        if self.load_error:
            raise RuntimeError(self.load_error)
        if self.service is not None and self.service.engine.failed:
            raise RuntimeError(f"engine failed: {self.service.engine.error}")

    def _ready(self):
        if self.service is None:
            raise APIError(503, self.load_error or "the model is still loading; retry shortly", None, "loading")
        return self.service

    @api.get("/health")
    async def health(self):
        replica_id = serve.get_replica_context().replica_id.unique_id
        if self.service is None:
            status = "failed" if self.load_error else "loading"
            return JSONResponse({"status": status, "error": self.load_error, "replica": replica_id}, status_code=503)
        engine = self.service.engine
        if engine.failed:
            return JSONResponse({"status": "failed", "error": "engine failed", "replica": replica_id}, status_code=503)
        return {"status": "ok", "model": self.service.served.name, "running": engine.running,
                "waiting": engine.waiting, "replica": replica_id}

    @api.get("/v1/models")
    async def models(self):
        return self._ready().models()

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        await faults.hold_requests()
        return await self._ready().completions(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        await faults.hold_requests()
        return await self._ready().chat(body)


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: serving.app:build_app`); bad args name the field."""
    settings = parse_args(args)
    return OpenAIServer.options(
        max_ongoing_requests=settings.max_ongoing_requests(),
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=settings.backpressure(),
        ray_actor_options=actor_options(settings),
    ).bind(settings.model_dump())


REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
"""Serve runs the app's handlers on the replica's own event loop, not on a second loop in a thread of its own
(one of the settings of Serve's `RAY_SERVE_THROUGHPUT_OPTIMIZED`): each streamed chunk then skips a hop between
two loops. The handlers never block (tokenizing and the engine run in threads of their own). Measured on 2 cores,
55M at 32 concurrent streams: about 5% more tokens/s (median of six A/B pairs, benchmarks/README.md)."""


def actor_options(settings: ServeArgs) -> dict:
    """A replica's resources (its CPUs, and one GPU when it serves on cuda) and its Serve settings."""
    return {"num_cpus": settings.cpus, **({"num_gpus": 1} if settings.device == "cuda" else {}),
            "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
