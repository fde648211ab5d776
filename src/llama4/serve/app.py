"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every failure answers with OpenAI's error body and a fitting status: 400 for bad requests (malformed
JSON, unknown fields, bad values, prompts too long), 401 for a wrong API key, 404 for an unknown
model, 413 for an oversized body, 429 past the queue limit and 503 while shutting down (both with
`Retry-After`), 500 only for a bug, and never with a traceback. A client that goes away cancels its
requests; their blocks are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.sampling import SamplingParams
from ..generation.scheduler import Request as GenRequest
from ..media.prompt import encode_prompt
from .engine import Engine
from .media import check_media, media_urls
from .metrics import Metrics
from .output import ChoiceText, chat_logprobs, completion_logprobs
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .tools import parse_tool_calls, with_tools

log = logging.getLogger("llama4.serve")


@dataclass
class ServeConfig:
    model_name: str = "llama4"
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    max_queue: int = 256  # requests waiting beyond the running ones
    allowed_media_dirs: list[Path] = field(default_factory=list)
    shutdown_timeout: float = 10.0
    max_tiles: int = 16


def create_app(engine: Engine, tokenizer, cfg: ServeConfig) -> FastAPI:
    model = engine.scheduler.model
    window = engine.scheduler.window
    eos = frozenset(model.config.text.eos_token_id) | frozenset(tokenizer.stop_ids)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.shutdown(cfg.shutdown_timeout)

    app = FastAPI(title="llama4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return JSONResponse(APIError(400, str(e.errors()[0].get("msg", "invalid request"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, e):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {cfg.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request, schema):
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {cfg.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model is not None and body.model != cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        if engine.draining:
            raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
        admit(body.n)  # before any prompt work; checked again when the choices are submitted
        return body

    def admit(count: int) -> None:
        limit = engine.scheduler.max_running + cfg.max_queue
        if engine.in_flight + count > limit:
            raise APIError(429, f"too many requests in flight ({engine.in_flight} of {limit}); retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def sampling(body, prompt: list[int], max_tokens: int | None, n_logprobs, choice: int = 0, **kw) -> GenRequest:
        try:
            params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                    top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                                    min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        room = window - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens but the context window is {window}",
                           param="messages", code="context_length_exceeded")
        mt = room if max_tokens is None else max_tokens
        seed = None if body.seed is None else (body.seed + choice) % 2 ** 64  # n choices must differ
        stop_ids = frozenset() if body.ignore_eos else eos
        return GenRequest(prompt, mt, params, seed, stop_ids, tuple(body.stop or ()), n_logprobs, **kw)

    async def run(request: Request, gens: list[GenRequest], states: list[ChoiceText]):
        """Submit every choice; then yields lists of (index, released text, event): all the events that
        have arrived, so a stream that fell behind catches up in one write. Cancels on exit."""
        admit(len(gens))
        out: asyncio.Queue = asyncio.Queue()
        submitted = []
        try:
            for i, g in enumerate(gens):
                try:
                    submitted.append(engine.submit(g, out, i))
                except ValueError as e:
                    raise APIError(400, str(e), code="context_length_exceeded" if "window" in str(e) else None)
            yield None  # submitted: the caller may now commit to a status code
            while not all(s.done for s in states):
                got = [await out.get()]
                while not out.empty():
                    got.append(out.get_nowait())
                batch = []
                for i, ev in got:
                    batch.append((i, states[i].push(ev), ev))
                    if ev.finish_reason is not None:
                        metrics.finished(gens[i])
                yield batch
        finally:
            for g in submitted:
                if g.finish_reason is None:
                    engine.cancel(g)

    async def collect(request: Request, stream_gen) -> None:
        """Drain a run for a non-streaming answer, cancelling if the client disconnects meanwhile."""
        async def drain():
            async for _ in stream_gen:
                pass

        task = asyncio.ensure_future(drain())
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
            await task
        finally:
            await stream_gen.aclose()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def first_then(gen):
        """Run `gen` up to its submission point, so errors become statuses, then stream the rest."""
        item = await gen.__anext__()
        assert item is None
        return gen

    # Routes -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "llama4", "max_model_len": window}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatCompletionRequest)
        messages = body.messages
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        use_tools = bool(tools) and body.tool_choice != "none"
        if use_tools:
            choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
            messages = with_tools(messages, tools, choice or "auto")
        check_media(messages, cfg.allowed_media_dirs)
        try:
            if any(media_urls(messages)):  # decoding images or video: off the event loop
                prompt = await asyncio.to_thread(encode_prompt, tokenizer, messages, model.config,
                                                 max_tiles=cfg.max_tiles)
            else:  # text only: ~0.1 ms, less than the hop to a worker thread
                prompt = encode_prompt(tokenizer, messages, model.config, max_tiles=cfg.max_tiles)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        salt = b""
        if prompt.pixel_values is not None:
            salt = hashlib.blake2b(prompt.pixel_values.float().numpy().tobytes(), digest_size=16).digest()
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        gens = [sampling(body, prompt.ids, max_tokens, n_lp, pixel_values=prompt.pixel_values, salt=salt, choice=k)
                for k in range(body.n)]
        states = [ChoiceText(tokenizer, eos, list(body.stop or ())) for _ in gens]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen = await first_then(run(request, gens, states))
        head = {"id": rid, "created": created, "model": cfg.model_name}

        def message(st: ChoiceText) -> tuple[dict, str]:
            content, calls = (parse_tool_calls(st.text) if use_tools else (st.text, []))
            msg = {"role": "assistant", "content": content if (content or not calls) else None}
            if calls:
                msg["tool_calls"] = [c.openai() for c in calls]
            reason = "tool_calls" if calls else _reason(st)
            return msg, reason

        if not body.stream:
            await collect(request, gen)
            choices = []
            for i, st in enumerate(states):
                msg, reason = message(st)
                choices.append({"index": i, "message": msg, "finish_reason": reason,
                                "logprobs": chat_logprobs(tokenizer, st.logprobs) if body.logprobs else None})
            _raise_if_error(states)
            return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(gens, body.n)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            extra = {"usage": None} if include_usage else {}
            chunk = {**head, "object": "chat.completion.chunk", **extra}
            for i in range(len(gens)):
                yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            lp_sent = [0] * len(gens)
            async for batch in gen:
                if data := "".join(chat_chunks(batch, chunk, lp_sent)):
                    yield data
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(gens, body.n)})
            yield "data: [DONE]\n\n"

        def chat_chunks(batch, chunk: dict, lp_sent: list[int]):
            for i, text, ev in batch:  # `states` already hold the whole batch: ask the event if it ends
                st, done = states[i], ev.finish_reason is not None
                if use_tools and not done:
                    continue  # tool calls are parsed from the whole answer
                delta = {}
                if use_tools:
                    msg, reason = message(st)
                    delta = {k: v for k, v in msg.items() if k != "role" and v is not None}
                    if "tool_calls" in delta:
                        delta["tool_calls"] = [{**c, "index": k} for k, c in enumerate(delta["tool_calls"])]
                elif text:
                    delta = {"content": text}
                lp = None
                if body.logprobs and len(st.logprobs) > lp_sent[i]:
                    lp = chat_logprobs(tokenizer, st.logprobs[lp_sent[i]:])
                    lp_sent[i] = len(st.logprobs)
                if delta or lp:
                    yield sse({**chunk, "choices": [{"index": i, "delta": delta or {"content": ""}, "logprobs": lp,
                                                     "finish_reason": None}]})
                if done:
                    if st.finish_reason == "error":
                        yield sse(APIError(500, st.error or "engine error", "server_error").body())
                    reason = message(st)[1] if use_tools else _reason(st)
                    yield sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                     "finish_reason": reason}]})

        return StreamingResponse(_closing(events(), gen), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
        prompts = _prompts(body.prompt, tokenizer, model.config.text.vocab_size)
        gens, states, texts = [], [], []
        for ids, text in prompts:
            for k in range(body.n):
                gens.append(sampling(body, ids, body.max_tokens, body.logprobs, choice=k,
                                     prompt_logprobs=body.echo and body.logprobs is not None))
                states.append(ChoiceText(tokenizer, eos, list(body.stop or ())))
                texts.append(text)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gen = await first_then(run(request, gens, states))
        head = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}

        def logprobs_of(i: int, st: ChoiceText):
            if body.logprobs is None:
                return None
            entries = list(st.logprobs)
            offset = 0
            if body.echo:
                g = gens[i]
                prompt_entries = [(t, lp, None) for t, lp in zip(g.prompt, g.prompt_lp)]
                entries = prompt_entries + entries
            return completion_logprobs(tokenizer, entries, offset)

        if not body.stream:
            await collect(request, gen)
            _raise_if_error(states)
            choices = [{"index": i, "text": (texts[i] if body.echo else "") + st.text, "finish_reason": _reason(st),
                        "logprobs": logprobs_of(i, st)} for i, st in enumerate(states)]
            return {**head, "choices": choices, "usage": _usage(gens, body.n)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            extra = {"usage": None} if include_usage else {}
            if body.echo:
                for i in range(len(gens)):
                    yield sse({**head, **extra, "choices": [{"index": i, "text": texts[i], "logprobs": None,
                                                             "finish_reason": None}]})
            async for batch in gen:
                if data := "".join(completion_chunks(batch, extra)):
                    yield data
            if include_usage:
                yield sse({**head, "choices": [], "usage": _usage(gens, body.n)})
            yield "data: [DONE]\n\n"

        def completion_chunks(batch, extra: dict):
            for i, text, ev in batch:
                st = states[i]
                if text:
                    yield sse({**head, **extra, "choices": [{"index": i, "text": text, "logprobs": None,
                                                             "finish_reason": None}]})
                if ev.finish_reason is not None:
                    if st.finish_reason == "error":
                        yield sse(APIError(500, st.error or "engine error", "server_error").body())
                    yield sse({**head, **extra, "choices": [{"index": i, "text": "", "finish_reason": _reason(st),
                                                             "logprobs": logprobs_of(i, st)}]})

        return StreamingResponse(_closing(events(), gen), media_type="text/event-stream")

    return app


async def _closing(events, gen):
    """Stream `events`; however the stream ends (finished, or the client went away), cancel the run."""
    try:
        async for item in events:
            yield item
    finally:
        await gen.aclose()


def _reason(st: ChoiceText) -> str:
    return {"cancelled": "stop", "error": "stop"}.get(st.finish_reason, st.finish_reason or "stop")


def _raise_if_error(states) -> None:
    for st in states:
        if st.finish_reason == "error":
            raise APIError(500, f"generation failed: {st.error}", "server_error")


def _usage(gens, n: int) -> dict:
    p = sum(len(g.prompt) for g in gens[::n])  # each prompt counted once, whatever n
    c = sum(len(g.generated) for g in gens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _prompts(prompt, tokenizer, vocab: int) -> list[tuple[list[int], str]]:
    """(ids, text) for each prompt of a completions request: strings are encoded with BOS, id lists kept."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for k, p in enumerate(prompt):
        if isinstance(p, str):
            ids = tokenizer.encode(p, bos=True)
            out.append((ids, p))
        else:
            if not p:
                raise APIError(400, f"prompt {k} is an empty token list", param="prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt {k} has token id(s) {bad[:4]} outside the vocabulary [0, {vocab})",
                               param="prompt")
            out.append((list(p), tokenizer.decode(p)))
    return out
