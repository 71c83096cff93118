"""The OpenAI endpoints' logic: requests → engine sequences → OpenAI responses or server-sent events.

Kept apart from the Ray Serve wiring (serving/app.py) so what a response contains is readable in
one place. Each choice is one engine sequence; its tokens become text as they are final
and stop strings (the request's and the model's `stop_strings`) end it without ever being sent
(model/textstream.py), after which the sequence is cancelled at once.

Tokenizing and rendering run on one thread beside the event loop (a long prompt must not stall the
other streams of the replica); the request limits (serving/protocol.py `Limits`) are checked before
anything reaches the engine. An engine that fails ends its requests with a 500 "engine failed" (an
error event on a stream that already started), never with the internal reason.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.responses import JSONResponse, StreamingResponse

from model.chat import check_messages, render
from model.sampling import Sampling
from model.textstream import TextStream
from serving.engine import FAILED, Engine, EngineFailed, QueueFull, Submitted
from serving.loader import ServedModel
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits

DONE = "data: [DONE]\n\n"
ENGINE_FAILED = "engine failed; this replica is being replaced, retry the request"
DEFAULT_LIMITS = Limits()  # OpenAIService's default (Limits is frozen, so one instance serves all)


def engine_failed(status: int = 500) -> APIError:
    return APIError(status, ENGINE_FAILED, None, "engine_failed")


@dataclass
class Piece:
    """Some final text of one choice; `finish` set on its last piece."""

    index: int
    text: str
    finish: str | None
    tokens: int


class OpenAIService:
    def __init__(self, served: ServedModel, engine: Engine, stream_interval: int = 1,
                 limits: Limits = DEFAULT_LIMITS):
        self.served, self.engine, self.stream_interval, self.limits = served, engine, stream_interval, limits
        self.created = int(time.time())
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tinyllama-tokenize")

    def close(self) -> None:
        """The replica's shutdown: the engine thread and the tokenizing thread end."""
        self.engine.stop()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, work: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work, *args)

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.served.name, "object": "model", "created": self.created, "owned_by": "tinyllama-pipeline",
            "root": str(self.served.directory), "max_model_len": self.served.context,
            "chat_template": self.served.chat_template is not None, "lineage": self.served.lineage}]}

    async def completions(self, body: CompletionRequest):
        self.limits.check_stops(body.stop)
        prompts = await self._off_loop(self._encode_texts, body.prompt)
        return await self._respond(body, prompts, "text_completion", "cmpl", "prompt")

    async def chat(self, body: ChatCompletionRequest):
        self.limits.check_stops(body.stop)
        if self.served.chat_template is None:
            raise APIError(400, f"model {self.served.name!r} has no chat template (tokenizer_config.json "
                                "chat_template); use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            check_messages(messages)
        except ValueError as exc:  # "messages[1].role: ..." → param messages.1.role, as validation errors name it
            where, _, reason = str(exc).partition(": ")
            param = where.replace("[", ".").replace("]", "")
            raise APIError(400, f"{param}: {reason}", param) from None
        prompt = await self._off_loop(self._encode_chat, messages)
        return await self._respond(body, [prompt], "chat.completion", "chatcmpl", "messages")

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [self.served.tokenizer.encode(text, bos=True) for text in texts]

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        text = render(self.served.chat_template, messages, add_generation_prompt=True).text
        return self.served.tokenizer.encode_chat(text)[0]

    def _submitted(self, body, prompts: list[list[int]], prompt_field: str) -> list[Submitted]:
        if body.model != self.served.name:
            raise APIError(404, f"model: {body.model!r} does not exist; this server serves {self.served.name!r}",
                           "model", "model_not_found")
        context = self.served.context
        limit_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        requests, loop = [], asyncio.get_running_loop()
        for prompt in prompts:
            self.limits.check_prompt(len(prompt), context, prompt_field)
            max_tokens = body.token_limit() or context - len(prompt)
            if len(prompt) + max_tokens > context:
                raise APIError(400, f"{limit_field}: this model's maximum context length is {context} tokens; the "
                                    f"prompt has {len(prompt)} and {limit_field} asks for {max_tokens} more",
                               limit_field, "context_length_exceeded")
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                sampling = Sampling(body.temperature, body.top_p, 0, seed)
                requests.append(Submitted(prompt, max_tokens, sampling, self.served.tokenizer.eos_id, loop))
        try:
            self.engine.submit(requests)
        except QueueFull as exc:
            raise APIError(429, str(exc), None, "server_busy", self.limits.retry_after()) from None
        except EngineFailed:
            raise engine_failed(503) from None
        return requests

    async def _respond(self, body, prompts, kind: str, id_prefix: str, prompt_field: str):
        submitted = self._submitted(body, prompts, prompt_field)
        stops = body.stop + list(self.served.stop_strings)
        pieces = _merge([self._choice(i, s, stops) for i, s in enumerate(submitted)])
        reply_id = f"{id_prefix}-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(pieces, kind, reply_id, len(submitted), usage, include_usage),
                                     media_type="text/event-stream")
        texts, finishes = [""] * len(submitted), [None] * len(submitted)
        async for piece in pieces:
            texts[piece.index] += piece.text
            finishes[piece.index] = piece.finish or finishes[piece.index]
            usage["completion_tokens"] += piece.tokens
        choices = [_choice_body(kind, i, text, finish) for i, (text, finish) in enumerate(zip(texts, finishes))]
        return JSONResponse({"id": reply_id, "object": kind, "created": int(time.time()), "model": self.served.name,
                             "choices": choices, "usage": _usage(usage)})

    async def _choice(self, index: int, request: Submitted, stops: list[str]) -> AsyncIterator[Piece]:
        """The choice's final text in pieces: the first as soon as there is text (time to first token),
        then every `stream_interval` tokens (vLLM's `--stream-interval`: fewer, larger chunks cost the
        server less per token), and whatever is left when it ends."""
        text = TextStream(self.served.tokenizer, request.prompt, stops)
        events = self.engine.stream(request)
        held, held_tokens, started = "", 0, False
        try:
            async for event in events:
                if event.finish == FAILED:
                    raise engine_failed()
                held += text.push(*event.tokens)
                held_tokens += len(event.tokens)
                if event.finish is not None:
                    held += text.finish()
                finish = "stop" if text.done else event.finish
                if finish is not None or (held and (not started or held_tokens >= self.stream_interval)):
                    yield Piece(index, held, finish, held_tokens)
                    held, held_tokens, started = "", 0, started or bool(held)
                if finish is not None:
                    return
        finally:
            await events.aclose()  # cancels the sequence unless it finished: a stop string, a disconnect

    async def _events(self, pieces: AsyncIterator[Piece], kind: str, reply_id: str, n: int, usage: dict,
                      include_usage: bool) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        created = int(time.time())

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": reply_id, "object": chunk_kind, "created": created, "model": self.served.name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if kind == "chat.completion":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(n)])
            try:
                async for piece in pieces:
                    usage["completion_tokens"] += piece.tokens
                    if piece.text or piece.finish:
                        yield chunk([_delta_body(kind, piece)])
            except APIError as exc:  # the stream has started (200): the error goes in it, as vLLM sends it
                yield f"data: {json.dumps(exc.body())}\n\n"
                yield DONE
                return
            if include_usage:
                yield chunk([], usage=_usage(usage))
            yield DONE
        finally:
            await pieces.aclose()  # a client that left: its sequences leave the batch at the next step


def _usage(usage: dict) -> dict:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def _choice_body(kind: str, index: int, text: str, finish: str | None) -> dict:
    if kind == "chat.completion":
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _delta_body(kind: str, piece: Piece) -> dict:
    if kind == "chat.completion":
        delta = {"content": piece.text} if piece.text else {}
        return {"index": piece.index, "delta": delta, "finish_reason": piece.finish}
    return {"index": piece.index, "text": piece.text, "finish_reason": piece.finish, "logprobs": None}


async def _merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Interleave the choices' pieces as they come; closing this closes (so cancels) every choice.

    Each choice is pumped by a task of its own; on the way out the pumps are cancelled and awaited
    before the choices are closed, so no choice is closed while its pump is still inside it (a
    client that leaves mid-stream cancels all its choices, without "generator already running")."""
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream):
        try:
            async for piece in stream:
                await queue.put(piece)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
