"""The Ray Serve application: an OpenAI-compatible FastAPI app over our own engine.

`build_app(args)` is the application builder Ray Serve's own tooling imports: a Serve config with
`import_path: serving.app:build_app` and `args:` (the fields of `ServeArgs`) is what
`serve deploy CONFIG` / `serve run CONFIG` and a KubeRay RayService run, and what `tinyllama serve`
runs locally. (`ray.serve.llm` needs vLLM and GPUs; on CPU we serve model/'s engine.)

A replica loads its model in a background thread, so `/health` can answer 503 while it loads and
200 once it serves; a load that fails makes Serve's health check fail with the reason. With
`api_key_env` set, every /v1 route needs `Authorization: Bearer <the key in that variable>`; the
key is read from the replica's environment and never logged (serving/auth.py).
"""


import logging
import os
import threading
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.responses import JSONResponse

from serving import auth
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error

logger = logging.getLogger("tinyllama.serving")
DEPLOYMENT = "tinyllama"
ONGOING_MARGIN = 8  # requests past slots + queue that Serve still forwards (health checks, model lists)


class ServeArgs(BaseModel):
    """What a replica serves and how; the `args:` of a Serve config."""

    model_config = ConfigDict(extra="forbid")
    model: str                                   # a HF Llama dir (registry refs are resolved to one first)
    name: str | None = None                      # the model id clients send; default: registry name or dir name
    draft: str | None = None                     # a draft model dir, or "prompt-lookup"
    draft_tokens: int = Field(4, ge=1, le=16)
    quant: Literal["none", "int8"] = "none"
    api_key_env: str | None = None               # env var holding the bearer key; unset: no auth
    slots: int = Field(8, ge=1)                  # sequences decoding together
    max_waiting: int = Field(64, ge=0)           # sequences queued for a slot before 429
    prefill_chunk: int = Field(128, ge=1)        # prompt tokens prefilled per step
    stream_interval: int = Field(1, ge=1)        # tokens per streamed chunk after the first
    cpus: int = Field(1, ge=1)                   # the replica's CPUs, and its torch threads
    device: Literal["cpu", "cuda"] = "cpu"       # cuda: the replica asks Serve for a GPU (num_gpus 1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False                        # the compiled decode step (model/step.py), compiled at load
    lineage_file: str | None = None              # the deploy stage's lineage.json


def parse_args(args: dict) -> ServeArgs:
    try:
        return ServeArgs(**args)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"serve args.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


api = FastAPI(title="tinyllama", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    error = validation_error(list(exc.errors()))
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception):
    logger.exception("request failed")
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
    return JSONResponse(error.body(), status_code=500)


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
            start = time.monotonic()
            decoder = BatchDecoder(served.model, self.args.slots, prefill_chunk=self.args.prefill_chunk,
                                   draft=served.draft, k=self.args.draft_tokens, compile=self.args.compile)
            engine = Engine(decoder, self.args.max_waiting, self.args.cpus, serve_observer())
            self.service = OpenAIService(served, engine, self.args.stream_interval)
            logger.info("serving %s from %s (%d slots, %s %s, %s in %.1f s)", served.name, served.directory,
                        self.args.slots, self.args.device, self.args.dtype,
                        "compiled" if self.args.compile else "eager", time.monotonic() - start)
        except Exception as exc:
            self.load_error = f"loading {self.args.model} failed: {exc}"
            logger.error(self.load_error)

    def check_health(self) -> None:
        if self.load_error:
            raise RuntimeError(self.load_error)

    def _ready(self):
        if self.service is None:
            raise APIError(503, self.load_error or "the model is still loading; retry shortly", None, "loading")
        return self.service

    @api.get("/health")
    async def health(self):
        if self.service is None:
            status = "failed" if self.load_error else "loading"
            return JSONResponse({"status": status, "error": self.load_error}, status_code=503)
        engine = self.service.engine
        return {"status": "ok", "model": self.service.served.name, "running": engine.running,
                "waiting": engine.waiting}

    @api.get("/v1/models")
    async def models(self):
        return self._ready().models()

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._ready().completions(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        return await self._ready().chat(body)

    def __del__(self):
        if self.service is not None:
            self.service.engine.stop()


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: serving.app:build_app`); bad args name the field."""
    settings = parse_args(args)
    return OpenAIServer.options(
        max_ongoing_requests=settings.slots + settings.max_waiting + ONGOING_MARGIN,
        ray_actor_options=actor_options(settings),
    ).bind(settings.model_dump())


def actor_options(settings: ServeArgs) -> dict:
    """A replica's resources: its CPUs, and one GPU when it serves on cuda."""
    return {"num_cpus": settings.cpus, **({"num_gpus": 1} if settings.device == "cuda" else {})}
