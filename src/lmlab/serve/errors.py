"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx or 5xx status.

Handlers raise APIError; ``add_error_handlers(app)`` makes FastAPI answer it, and its own errors
(a body that is not JSON or does not validate, an unknown path), in that shape. Invalid bodies get
400, as OpenAI answers them, not FastAPI's 422.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lmlab.serve.schemas import ErrorDetail, ErrorResponse

# What each status means on this server (the descriptions /docs shows).
STATUS_MEANING = {
    400: "The request is invalid (malformed JSON, a wrong field, a prompt too long for the model).",
    401: "The API key is missing or wrong.",
    404: "The request names a model this server does not serve.",
    413: "The request body is larger than the server accepts.",
    429: "The server is busy: too many sequences are waiting.",
    500: "Generation failed.",
    504: "The request took longer than the server's timeout.",
}


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body with its status (for code that answers without raising)."""
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status)


def error_responses(*statuses: int) -> dict:
    """The ``responses=`` of a route that may answer these statuses: each with the ErrorResponse body
    (so /openapi.json documents the error shape, not FastAPI's default 422)."""
    return {status: {"model": ErrorResponse, "description": STATUS_MEANING[status]} for status in statuses}


def add_error_handlers(app: FastAPI) -> None:
    """Answer APIError, invalid requests and unknown paths with OpenAI-style errors."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=e.detail).model_dump(), e.status)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    # a value that fits no member of a union fails once per member: text that is not Unicode says most
    first = next((x for x in errors if x.get("type") == "invalid_unicode"), errors[0])
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    where = _field_path(first.get("loc", ()))
    return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)


def _field_path(loc: tuple) -> str:
    """The fields and indices of a validation error's location, dotted (``messages.0.content``): without
    "body", and without the member types pydantic adds inside a union (``prompt.list[int].0``)."""
    return ".".join(str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x not in UNION_MEMBERS))


UNION_MEMBERS = {"body", "str", "int", "float", "bool"}  # location parts that are not field names


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), type=kind)
