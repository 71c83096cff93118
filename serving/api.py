"""The OpenAI endpoints' logic: requests → engine sequences → OpenAI responses or server-sent events.

Kept apart from the Ray Serve wiring (serving/app.py) so what a response contains is readable in
one place. Each choice is one engine sequence; its tokens become text as they are final
and stop strings (the request's and the model's `stop_strings`) end it without ever being sent
(model/textstream.py), after which the sequence is cancelled at once.

Each choice samples under the request's settings (temperature, top-p/k, min-p, the three penalties,
applied inside the engine's step) and, when asked, reports its tokens' log-probabilities
(serving/logprobs.py); `echo` puts the prompt's text (and its tokens' log-probabilities, read from the
prefill) before the completion's. Tokenizing and rendering run on one thread beside the event loop (a
long prompt must not stall the other streams of the replica); the request limits (serving/protocol.py
`Limits`) are checked before anything reaches the engine. An engine that fails ends its requests
with a 500 "engine failed" (an error event on a stream that already started), never with the
internal reason.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.responses import JSONResponse, StreamingResponse

from model.chat import check_messages, render
from model.sampling import Sampling, TokenLogprob
from model.textstream import TextStream
from serving.engine import FAILED, Engine, EngineFailed, QueueFull, Submitted
from serving.loader import ServedModel
from serving.logprobs import LogprobFormat
from serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits

DONE = "data: [DONE]\n\n"
ENGINE_FAILED = "engine failed; this replica is being replaced, retry the request"
DEFAULT_LIMITS = Limits()  # OpenAIService's default (Limits is frozen, so one instance serves all)


def engine_failed(status: int = 500) -> APIError:
    return APIError(status, ENGINE_FAILED, None, "engine_failed")


@dataclass
class Piece:
    """Some final text of one choice and the tokens behind it; `finish` set on its last piece; the first
    carries the prompt's log-probabilities when the request echoes them."""

    index: int
    text: str
    finish: str | None
    tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached: int = 0  # prompt tokens the prompt cache served (on the choice's first piece)

    def extend(self, later: Piece) -> None:
        self.text += later.text
        self.finish = later.finish or self.finish
        self.tokens += later.tokens
        self.cached += later.cached
        self.logprobs += later.logprobs
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs


class OpenAIService:
    def __init__(self, served: ServedModel, engine: Engine, stream_interval: int = 1,
                 limits: Limits = DEFAULT_LIMITS):
        self.served, self.engine, self.stream_interval, self.limits = served, engine, stream_interval, limits
        self.created = int(time.time())
        self.logprob_format = LogprobFormat(served.tokenizer)
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
        self.limits.check_logprobs(body.logprobs, "logprobs")
        prompts, echoes = await self._off_loop(self._read_prompts, body.prompt, bool(body.echo))
        return await self._respond(body, prompts, "text_completion", "cmpl", "prompt", echoes)

    async def chat(self, body: ChatCompletionRequest):
        self.limits.check_stops(body.stop)
        self.limits.check_logprobs(body.top_logprobs, "top_logprobs")
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

    def _read_prompts(self, prompts: list[str] | list[list[int]], echo: bool) -> tuple[list[list[int]], list | None]:
        """(token ids, echoed texts or None): texts encoded with BOS first (as pretraining put it before every
        document); token ids as they are (the client's own tokenization, BOS included or not), each checked
        against the vocabulary, and echoed as their decoded text."""
        tokenizer, vocab, encoded = self.served.tokenizer, self.served.model.config.vocab_size, []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                encoded.append(tokenizer.encode(prompt, bos=True))
                continue
            if max(prompt) >= vocab:
                raise APIError(400, f"prompt: token id {max(prompt)} of prompt {i} is outside the vocabulary "
                                    f"({vocab} tokens)", "prompt")
            encoded.append(list(prompt))
        echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if echo else None
        return encoded, echoes

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
                requests.append(Submitted(prompt, max_tokens, _sampling(body, i), self.served.tokenizer.eos_id, loop))
        try:
            self.engine.submit(requests)
        except QueueFull as exc:
            raise APIError(429, str(exc), None, "server_busy", self.limits.retry_after()) from None
        except EngineFailed:
            raise engine_failed(503) from None
        return requests

    async def _respond(self, body, prompts, kind: str, id_prefix: str, prompt_field: str,
                       echoes: list[str] | None = None):
        submitted = self._submitted(body, prompts, prompt_field)
        stops = body.stop + list(self.served.stop_strings)
        pieces = _merge([self._choice(i, s, stops, echoes[i // body.n] if echoes else "")
                         for i, s in enumerate(submitted)])
        reply_id = f"{id_prefix}-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0, "cached_tokens": 0}
        logprobs = ChoiceLogprobs(self.logprob_format, kind, body.top_logprobs_asked() is not None, prompts, body.n)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(pieces, kind, reply_id, len(submitted), usage, include_usage,
                                                  logprobs), media_type="text/event-stream")
        whole = [Piece(i, "", None, 0) for i in range(len(submitted))]
        async for piece in pieces:
            whole[piece.index].extend(piece)
            usage["completion_tokens"] += piece.tokens
            usage["cached_tokens"] += piece.cached
        choices = [_choice_body(kind, piece, logprobs.of(piece)) for piece in whole]
        return JSONResponse({"id": reply_id, "object": kind, "created": int(time.time()), "model": self.served.name,
                             "choices": choices, "usage": _usage(usage)})

    async def _choice(self, index: int, request: Submitted, stops: list[str], echo: str) -> AsyncIterator[Piece]:
        """The choice's final text in pieces: the first as soon as there is text (time to first token;
        with `echo`, the prompt's text opens it), then every `stream_interval` tokens (vLLM's
        `--stream-interval`: fewer, larger chunks cost the server less per token), and whatever is left
        when it ends. Each piece carries its tokens' log-probabilities (when the request asked)."""
        text = TextStream(self.served.tokenizer, request.prompt, stops)
        events = self.engine.stream(request)
        held, started = Piece(index, echo, None, 0), False
        try:
            async for event in events:
                if event.finish == FAILED:
                    raise engine_failed()
                held.extend(Piece(index, text.push(*event.tokens), None, len(event.tokens), event.logprobs,
                                  event.prompt_logprobs, event.cached))
                if event.finish is not None:
                    held.text += text.finish()
                held.finish = "stop" if text.done else event.finish
                if held.finish is not None or (held.text and (not started or held.tokens >= self.stream_interval)):
                    yield held
                    started = started or bool(held.text)
                    if held.finish is not None:
                        return
                    held = Piece(index, "", None, 0)
        finally:
            await events.aclose()  # cancels the sequence unless it finished: a stop string, a disconnect

    async def _events(self, pieces: AsyncIterator[Piece], kind: str, reply_id: str, n: int, usage: dict,
                      include_usage: bool, logprobs: ChoiceLogprobs) -> AsyncIterator[str]:
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
                    usage["cached_tokens"] += piece.cached
                    if piece.text or piece.finish:
                        yield chunk([_delta_body(kind, piece, logprobs.of(piece))])
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
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt tokens whose keys and
    values the prompt cache already held (as OpenAI and vLLM report them; each choice of `n` counts its own)."""
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


def _sampling(body, choice: int) -> Sampling:
    """Choice `choice`'s engine settings (a seed gives choice i the seed + i, so choices differ)."""
    top = body.top_logprobs_asked()
    return Sampling(body.temperature, body.top_p, max(body.top_k, 0), None if body.seed is None else body.seed + choice,
                    body.min_p, body.presence_penalty, body.frequency_penalty, body.repetition_penalty, logprobs=top,
                    prompt_logprobs=top if getattr(body, "echo", False) else None)


class ChoiceLogprobs:
    """A reply's `logprobs` per choice in its endpoint's shape (None when the request did not ask): the
    whole choice's, or a stream chunk's, whose legacy `text_offset`s continue where the last chunk's ended."""

    def __init__(self, fmt: LogprobFormat, kind: str, asked: bool, prompts: list[list[int]], n: int):
        self.fmt, self.chat, self.asked, self.prompts, self.n = fmt, kind == "chat.completion", asked, prompts, n
        self.offsets: dict[int, int] = {}

    def of(self, piece: Piece) -> dict | None:
        if not self.asked:
            return None
        if self.chat:
            return {"content": self.fmt.chat(piece.logprobs), "refusal": None}
        tokens, entries = [e.token for e in piece.logprobs], list(piece.logprobs)
        if piece.prompt_logprobs is not None:  # echo: the prompt's tokens first
            tokens, entries = self.prompts[piece.index // self.n] + tokens, piece.prompt_logprobs + entries
        offset = self.offsets.get(piece.index, 0)
        result = self.fmt.completion(tokens, entries, offset)
        self.offsets[piece.index] = offset + sum(map(len, result["tokens"]))
        return result


def _choice_body(kind: str, piece: Piece, logprobs: dict | None) -> dict:
    if kind == "chat.completion":
        return {"index": piece.index, "message": {"role": "assistant", "content": piece.text},
                "finish_reason": piece.finish, "logprobs": logprobs}
    return {"index": piece.index, "text": piece.text, "finish_reason": piece.finish, "logprobs": logprobs}


def _delta_body(kind: str, piece: Piece, logprobs: dict | None) -> dict:
    if kind == "chat.completion":
        delta = {"content": piece.text} if piece.text else {}
        return {"index": piece.index, "delta": delta, "finish_reason": piece.finish, "logprobs": logprobs}
    return {"index": piece.index, "text": piece.text, "finish_reason": piece.finish, "logprobs": logprobs}


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
