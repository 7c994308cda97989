"""An OpenAI-compatible HTTP server over the generation engine, and the web chat page.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /`` (the chat page) and FastAPI's
``/openapi.json`` and ``/docs``. Errors are OpenAI-shaped (``{"error": {"message", "type",
"param", "code"}}``) with a 4xx status for anything wrong with the request; the server keeps serving.
Generation runs in batches on a worker thread (serve/scheduler.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

import torch.nn as nn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import lmlab
from lmlab.config import ServeConfig
from lmlab.data.chat import chat_prompt
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.engine import Completion, fit_prompt
from lmlab.generate.sampling import SamplingParams
from lmlab.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from lmlab.serve.scheduler import QueueFull, Scheduler, Sequence


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body with its status."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``max_bytes`` with 413, before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def sse(data: dict | str) -> str:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model: nn.Module, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``model`` under the name ``cfg.model_name``."""
    app = FastAPI(title="lmlab", version=lmlab.__version__,
                  description="OpenAI-compatible completions and chat completions from an lmlab checkpoint.")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    scheduler = Scheduler(model, tokenizer, cfg.max_batch_size, cfg.max_queue)
    app.state.scheduler = scheduler
    app.router.add_event_handler("shutdown", scheduler.close)
    created = int(time.time())
    context = model.context_length
    prompt_limits = [x for x in (cfg.max_prompt_tokens, context and context - 1) if x is not None]  # room for 1 token
    max_prompt = min(prompt_limits) if prompt_limits else None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse({"error": e.body}, e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type=kind)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lmlab.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness and queue depth")
    async def health() -> dict:
        return {"status": "ok", "model": cfg.model_name, "queued": scheduler.queued, "running": scheduler.running}

    @app.get("/v1/models", dependencies=[Depends(authorize)], summary="The model this server serves")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "lmlab"}]}

    def sampling(req: SamplingFields, max_tokens: int, choice: int, stop_tokens: list[int] = (),
                 stop: list[str] = ()) -> SamplingParams:
        """The engine's SamplingParams for one choice of a request (choice i of n uses seed + i)."""
        if max_tokens > cfg.max_new_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_new_tokens}",
                           param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: give up to 4 non-empty strings", param="stop")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1 else None, top_k=req.top_k, min_p=req.min_p,
                                repetition_penalty=req.repetition_penalty or 1.0,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                seed=None if req.seed is None else req.seed + choice,
                                stop_tokens=list(stop_tokens), stop=[*stops, *stop])
        try:
            params.validate()
        except LmlabError as e:
            raise APIError(400, str(e)) from None
        return params

    def check_model_and_prompt(req: SamplingFields, prompt_ids: list[int], max_tokens: int) -> None:
        if req.model != cfg.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{cfg.model_name}'",
                           type="not_found_error", param="model", code="model_not_found")
        if max_prompt is not None and len(prompt_ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server allows at most {max_prompt}"
                                f"{f' (the model context is {context} tokens)' if context else ''}",
                           param="prompt", code="context_length_exceeded")
        try:
            fit_prompt(prompt_ids, context, max_tokens)
        except LmlabError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def enqueue(prompts: list[list[int]], params: list[SamplingParams]) -> list[Sequence]:
        if len(prompts) > cfg.max_queue:
            raise APIError(400, f"the request asks for {len(prompts)} sequences; this server takes at most "
                                f"{cfg.max_queue} per request", param="prompt")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        sequences = [Sequence(p, q, i, events, loop) for i, (p, q) in enumerate(zip(prompts, params))]
        try:
            scheduler.submit(sequences)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
        return sequences

    async def events_of(sequences: list[Sequence]) -> AsyncIterator[tuple]:
        """The sequences' events until all are done; cancels them on timeout or when the client leaves."""
        events, left = sequences[0].events, len(sequences)
        deadline = time.monotonic() + cfg.request_timeout
        try:
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                event = await asyncio.wait_for(events.get(), remaining)
                if event[0] == "error":
                    raise APIError(500, event[2], type="server_error")
                left -= event[0] == "done"
                yield event
        except asyncio.TimeoutError:
            raise APIError(504, f"the request took longer than {cfg.request_timeout:g} s", type="timeout_error",
                           code="timeout") from None
        finally:
            for s in sequences:
                s.cancelled = True  # no-op for finished ones; frees the batch slot of the others

    def usage(prompts: list[list[int]], done: dict[int, Completion], n: int) -> dict:
        prompt_tokens = sum(len(prompts[i]) for i in range(0, len(prompts), n))
        completion_tokens = sum(c.completion_tokens for c in done.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def chunks_of(sequences: list[Sequence], head: dict, opening: list[dict], choice, include_usage: bool,
                        prompts: list[list[int]], n: int) -> AsyncIterator[dict]:
        """The chunks of a streamed response: ``opening`` ones, then one per event, the choice shaped by
        ``choice(kind, index, value)``; then, if asked, a last chunk with the usage."""
        for chunk in opening:
            yield chunk
        done: dict[int, Completion] = {}
        async for kind, i, value in events_of(sequences):
            if kind == "done":
                done[i] = value
            yield {**head, "choices": [choice(kind, i, value)]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompts, done, n)}

    def streamed(chunks: AsyncIterator[dict], sequences: list[Sequence]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except APIError as e:  # the status line is gone already: the error travels as an event
                yield sse({"error": e.body})
            finally:  # also when the client disconnects mid-stream: stop generating for it
                for s in sequences:
                    s.cancelled = True
            yield sse("[DONE]")
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Depends(authorize)], summary="Continue a prompt")
    async def completions(req: CompletionRequest):
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        texts = _prompts_of(req.prompt)
        ids = [t if isinstance(t, list) else tokenizer.encode(t) for t in texts]
        for p in ids:
            check_model_and_prompt(req, p, req.max_tokens or 16)
        if any(t >= model.config.vocab_size or t < 0 for p in ids for t in p):
            raise APIError(400, f"prompt: token ids must be in [0, {model.config.vocab_size})", param="prompt")
        prompts = [p for p in ids for _ in range(req.n)]
        params = [sampling(req, req.max_tokens or 16, i % req.n) for i in range(len(prompts))]
        sequences = enqueue(prompts, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": cfg.model_name}
        echo = [tokenizer.decode(p) if req.echo else "" for p in prompts]

        if req.stream:
            def choice(kind, i, value):
                return {"index": i, "text": value if kind == "text" else "", "logprobs": None,
                        "finish_reason": value.finish_reason if kind == "done" else None}
            opening = [{**head, "choices": [choice("text", i, text)]} for i, text in enumerate(echo) if text]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streamed(chunks_of(sequences, head, opening, choice, include_usage, prompts, req.n), sequences)

        done = {i: c async for kind, i, c in events_of(sequences) if kind == "done"}
        choices = [{"index": i, "text": echo[i] + done[i].text, "logprobs": None,
                    "finish_reason": done[i].finish_reason} for i in sorted(done)]
        return {**head, "choices": choices, "usage": usage(prompts, done, req.n)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], summary="The assistant's next turn")
    async def chat_completions(req: ChatCompletionRequest):
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        ids, stop_tokens, stop = chat_prompt(tokenizer, messages)
        check_model_and_prompt(req, ids, max_tokens)
        prompts = [ids] * req.n
        params = [sampling(req, max_tokens, i, stop_tokens, stop) for i in range(req.n)]
        sequences = enqueue(prompts, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_name}

        if req.stream:
            def choice(kind, i, value):
                if kind == "text":
                    return {"index": i, "delta": {"content": value}, "logprobs": None, "finish_reason": None}
                return {"index": i, "delta": {}, "logprobs": None, "finish_reason": value.finish_reason}
            chunk = {**head, "object": "chat.completion.chunk"}
            opening = [{**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]} for i in range(req.n)]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streamed(chunks_of(sequences, chunk, opening, choice, include_usage, prompts, req.n), sequences)

        done = {i: c async for kind, i, c in events_of(sequences) if kind == "done"}
        choices = [{"index": i, "message": {"role": "assistant", "content": done[i].text}, "logprobs": None,
                    "finish_reason": done[i].finish_reason} for i in sorted(done)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(prompts, done, req.n)}

    return app


def _prompts_of(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return prompts
