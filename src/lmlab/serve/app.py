"""An OpenAI-compatible HTTP server over the generation engine, and the web chat page.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models`` and ``/v1/models/{model}``, ``GET /health``, ``GET /`` (the chat page) and FastAPI's
``/openapi.json`` and ``/docs``. Errors are OpenAI-shaped (``{"error": {"message", "type",
"param", "code"}}``) with a 4xx status for anything wrong with the request; the server keeps serving.

The package: ``create_app`` here puts it together; the handlers are in serve/routes.py, the request
and response bodies in serve/schemas.py, the errors in serve/errors.py, and the batching of
generation on a worker thread in serve/scheduler.py.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import os
import socket
from importlib import resources
from pathlib import Path

import torch.nn as nn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic.json_schema import models_json_schema

import lmlab
from lmlab.config import ServeConfig, from_dict
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.serve.errors import add_error_handlers, error_response
from lmlab.serve.routes import ServeState, context_prompt_limit, router
from lmlab.serve.schemas import ChatCompletionChunk, ErrorResponse, TextCompletionChunk

log = logging.getLogger(__name__)
API_KEY_VARIABLE = "LMLAB_API_KEY"  # where the API key comes from when --api-key is not given
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STREAM_CHUNKS = {"/v1/completions": TextCompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


def create_app(model: nn.Module, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``model`` under the name ``cfg.model_name``: the API of
    serve/routes.py, the chat page at ``/``, OpenAI-style errors and the body size limit. Its
    generation worker starts now and stops when the app shuts down."""
    app = FastAPI(title="lmlab", version=lmlab.__version__, lifespan=_lifespan,
                  description="OpenAI-compatible completions and chat completions from an lmlab checkpoint.")
    warn_if_beyond_context(cfg, context_prompt_limit(model))
    app.state.serve = ServeState.start(model, tokenizer, cfg)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    add_error_handlers(app)
    app.include_router(router)
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.openapi = functools.partial(openapi, app)
    return app


def warn_if_beyond_context(cfg: ServeConfig, limit: int | None) -> None:
    """Say so when --max-prompt-tokens asks for more than the model's context allows (``limit``:
    serve.routes.context_prompt_limit; prompts are capped to it)."""
    if limit is not None and cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens > limit:
        log.warning(f"--max-prompt-tokens {cfg.max_prompt_tokens} is beyond what the model's context allows: "
                    f"prompts are limited to {limit} tokens")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.serve.reopen()  # the app may be started again after a shutdown (a test client per test does)
    yield
    app.state.serve.close()


async def page(request: Request) -> HTMLResponse:
    """The web chat page: one static file that talks to /v1/chat/completions; for an encoder-decoder, which
    does not chat, a note on how to call /v1/completions instead."""
    if request.app.state.serve.encoder_decoder:
        return HTMLResponse(SEQ2SEQ_PAGE.format(name=html.escape(request.app.state.serve.cfg.model_name),
                                                base=html.escape(str(request.base_url))))
    return HTMLResponse(resources.files("lmlab.serve").joinpath("static/index.html").read_text(encoding="utf-8"))


SEQ2SEQ_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lmlab: {name}</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 2em auto">
<h1>{name}</h1>
<p>This server serves an encoder-decoder (translation, summarization): it answers
<code>POST /v1/completions</code> with the source as the <code>prompt</code> and the target as the completion.
It does not chat, so there is no chat page. The API is described at <a href="/docs">/docs</a>.</p>
<pre>curl -s {base}v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{name}", "prompt": "A man rides a bike.", "max_tokens": 64, "temperature": 0}}'</pre>
</body></html>
"""


def openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI schema of ``app``, completed where FastAPI cannot know: the generation routes
    also answer with server-sent events of chunks (``stream: true``), and invalid bodies get 400 with
    an ErrorResponse rather than FastAPI's 422."""
    schema = FastAPI.openapi(app)  # cached by FastAPI; the changes below are idempotent
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, chunk_schemas = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS.values()],
                                          ref_template="#/components/schemas/{model}")
    for name, definition in chunk_schemas["$defs"].items():
        components.setdefault(name, definition)
    for path, chunk in STREAM_CHUNKS.items():
        responses = schema["paths"][path]["post"]["responses"]
        chunk_or_error = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorResponse)]}
        json_event = {"type": "string", "contentMediaType": "application/json", "contentSchema": chunk_or_error}
        responses["200"]["content"]["text/event-stream"] = {"itemSchema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [json_event, {"const": "[DONE]"}],
                                    "description": "a chunk (or an error) as JSON; the last event is the literal [DONE]"}}}}
    for operations in schema["paths"].values():  # FastAPI's 422, which this server never sends
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


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


def check_can_listen(host: str, port: int) -> None:
    """Raise a one-line LmlabError if ``host:port`` cannot be listened on (bad port, unknown host, port
    taken): ``lmlab serve`` checks before it loads the model, so that it fails fast."""
    if not 1 <= port <= 65535:
        raise LmlabError(f"--port must be between 1 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind((host, port))
    except OSError as e:
        raise LmlabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_server(model: nn.Module, tokenizer: Tokenizer, cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve ``model`` with uvicorn until interrupted (``lmlab serve``); warns when the server is
    reachable from other machines without an API key."""
    import uvicorn

    if cfg.host not in LOCAL_HOSTS and not cfg.api_key:
        log.warning(f"serving on {cfg.host} without an API key: anyone who can reach it can use it "
                    f"(set --api-key or {API_KEY_VARIABLE})")
    app = create_app(model, tokenizer, cfg)
    log.info(f"serving '{cfg.model_name}' on http://{cfg.host}:{cfg.port}  (chat page: /, API: /v1, docs: /docs)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level)


def serve_config(values: dict, source: str) -> ServeConfig:
    """The validated ServeConfig of ``lmlab serve``: the given values (None = the default), the API key
    from $LMLAB_API_KEY when none is given, and the model named after ``source``'s folder by default."""
    values = {k: v for k, v in values.items() if v is not None}
    values.setdefault("api_key", os.environ.get(API_KEY_VARIABLE) or None)
    values.setdefault("model_name", Path(source).resolve().name)
    return from_dict(ServeConfig, values)
