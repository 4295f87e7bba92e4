"""The agent's local HTTP API (FastAPI): a thin adapter over :class:`Agent`.

* ``POST /v1/infer`` — one input as JSON, either ``{"data": [[…]]}`` (nested lists) or
  ``{"b64": "…", "shape": [1, 64, 64], "dtype": "uint8"}`` (raw little-endian bytes);
  ``dtype`` defaults to the model's. Answers with the :class:`Answer` as JSON.
* ``GET /v1/info`` — site, bundle, codec, thresholds and the model input.
* ``GET /healthz`` — the process is alive.
* ``GET /readyz`` — 200 once the model is warm and MQTT is connected, 503 before and
  after a thread failed for good (``failed`` says which and why).
* ``GET /metrics`` — this agent's Prometheus registry, text format.

Errors are JSON ``{"error": message, "type": name}``, on every route and status: 413 for
a body over ``http.max_body_bytes`` (refused from ``Content-Length`` before anything is
read, or as soon as the stream passes the limit), 422 for an input that does not fit the
model (the message names the field and the problem, and repeats at most a few hundred
characters of what was sent), 404/405 for an unknown route or method, 503 when the agent
is not running or overloaded (with ``Retry-After``), 507 when the outbox's storage is
full (the item was not stored and not sent; with ``Retry-After``), 504 when the cloud did
not answer in time, 502 when it answered with an error, 500 when a handler failed
unexpectedly (logged with the route and counted as
``fogline_agent_thread_failures_total{thread="http"}``; the server goes on). The body is
read as JSON whatever its
``Content-Type`` says, as the cloud's inference API does. HTTP status codes live here,
not in the errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fogline.edge_agent._agent import PRIORITY_MAX, PRIORITY_MIN, Agent
from fogline.edge_agent._runtime import InputSpec
from fogline.edge_agent._version import fogline_version
from fogline.edge_agent.errors import (
    AgentError,
    BrokerError,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    CloudUnavailableError,
    InputError,
    NotRunningError,
    OutboxError,
    OutboxEvictedError,
    OutboxStorageFullError,
    OverloadedError,
)
from fogline.messaging import ContainedHttp

__all__ = ["create_app"]

# How much of a refused value an error message repeats: enough to recognise it, never the
# whole body back.
_ECHO_CHARS = 200
# Retry-After of a 507 (the outbox's disk is full): room comes back when the backlog drains
# or an operator frees space, not within the second a busy agent asks for.
_FULL_RETRY_AFTER_S = "10"
_STATUS_TYPES = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
}

_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)


class InferRequest(BaseModel):
    """One input: ``data`` as nested lists, or ``b64`` raw bytes with ``shape``."""

    model_config = ConfigDict(extra="forbid")

    data: Any = Field(default=None, description="the input as nested lists of numbers")
    b64: str | None = Field(default=None, description="base64 of the raw little-endian bytes")
    shape: list[int] | None = Field(default=None, description="shape of the input")
    dtype: str | None = Field(default=None, description="element type; default: the model's")
    tag: str | None = Field(
        default=None,
        max_length=1024,
        description="your correlation string, returned with the answer",
    )
    priority: int = Field(
        default=0,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="outbox eviction priority if forwarded (lowest evicted first)",
    )


class _BodyError(Exception):
    """A request body refused before it reaches the model: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(
    status: int, exc: BaseException | str, headers: dict[str, str] | None = None
) -> JSONResponse:
    message = exc if isinstance(exc, str) else str(exc)
    kind = "BadRequest" if isinstance(exc, str) else type(exc).__name__
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def _dtype(name: str | None, spec: InputSpec) -> np.dtype[Any]:
    if name is None:
        return spec.dtype
    if name not in _DTYPES:
        raise InputError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}")
    dtype = np.dtype(name)
    if dtype != spec.dtype and not np.can_cast(dtype, spec.dtype, "safe"):
        raise InputError(f"dtype {name} does not fit the model input, which takes {spec.dtype}")
    return dtype


def _decode(req: InferRequest, spec: InputSpec) -> np.ndarray:
    """The request's input as an array in the model's dtype and item shape."""
    has_data, has_b64 = req.data is not None, req.b64 is not None
    if has_data == has_b64:
        raise InputError("give exactly one of 'data' (nested lists) or 'b64' (raw bytes)")
    dtype = _dtype(req.dtype, spec)
    if req.shape is not None and any(d < 0 for d in req.shape):
        raise InputError(f"shape {req.shape} has a negative dimension")
    if has_b64:
        if req.shape is None:
            raise InputError("'shape' is required with 'b64'")
        try:
            raw = base64.b64decode(req.b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise InputError("'b64' is not valid base64") from None
        need = math.prod(req.shape) * dtype.itemsize
        if len(raw) != need:
            raise InputError(
                f"'b64' holds {len(raw)} bytes; shape {req.shape} of {dtype} needs {need}"
            )
        arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(req.shape)
    else:
        try:
            arr = np.asarray(req.data)
        except (ValueError, TypeError):
            raise InputError("'data' is not a rectangular array (rows of unequal length)") from None
        if arr.dtype.kind not in "biuf":
            raise InputError("'data' must hold only numbers")
        if spec.dtype.kind != "b" and _holds_bool(req.data):
            # JSON true is not the number 1: a client that sends it has a bug to hear about.
            raise InputError("'data' must hold only numbers, not true/false")
        if req.shape is not None and list(arr.shape) != req.shape:
            raise InputError(f"'data' has shape {list(arr.shape)} but 'shape' says {req.shape}")
        arr = InputSpec("data", dtype, tuple(arr.shape)).cast(arr, "'data'")
    return spec.item(arr)


def _holds_bool(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
            continue
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _clip("; ".join(parts) or "invalid request")


def _clip(text: str, limit: int = 4 * _ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def _error_detail(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic's errors without the ``input`` each one carries: that is the body itself."""
    out = []
    for err in errors[:5]:
        item = {k: v for k, v in err.items() if k in ("type", "loc", "msg")}
        item["msg"] = _clip(str(item.get("msg", "")), _ECHO_CHARS)
        out.append(jsonable_encoder(item))
    return out


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _BodyError(400, f"Content-Length must be an integer, got {declared[:40]!r}")
        if int(declared) > limit:
            raise _BodyError(
                413, f"the request body is {int(declared)} bytes, over the {limit}-byte limit"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyError(413, f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _internal_error(exc: BaseException) -> JSONResponse:
    """The answer to a request whose handler failed unexpectedly."""
    error = f"internal error ({type(exc).__name__}), logged"
    return JSONResponse({"error": error, "type": "InternalError"}, status_code=500)


def _parse(body: bytes) -> InferRequest:
    try:
        obj = json.loads(body)
    except RecursionError:
        raise InputError("the request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise InputError("the request body is not valid JSON") from None
    return InferRequest.model_validate(obj)


def create_app(agent: Agent, *, max_body_bytes: int | None = None) -> FastAPI:
    """The HTTP API over ``agent``. The caller starts and stops the agent.

    ``max_body_bytes`` defaults to the agent's ``http.max_body_bytes``."""
    limit = agent.config.http.max_body_bytes if max_body_bytes is None else max_body_bytes
    if limit <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {limit}")
    app = FastAPI(
        title=f"fogline edge agent ({agent.site})",
        version=fogline_version(),
        docs_url=None,
        redoc_url=None,
    )
    supervisor = agent.supervisor
    app.add_middleware(
        ContainedHttp,
        on_error=lambda route, exc: supervisor.contained("http", f"request {route}", exc),
        answer=_internal_error,
    )

    def _invalid_response(errors: list[Any]) -> JSONResponse:
        return JSONResponse(
            {
                "error": _validation_message(errors),
                "type": "RequestValidationError",
                "detail": _error_detail(errors),
            },
            status_code=422,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "HTTPError")
        return JSONResponse(
            {"error": _clip(str(exc.detail)), "type": kind},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    body_schema = InferRequest.model_json_schema()

    @app.post(
        "/v1/infer",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        },
    )
    async def infer(request: Request) -> Response:
        try:
            req = _parse(await _read_body(request, limit))
        except _BodyError as exc:
            return JSONResponse(
                {"error": str(exc), "type": _STATUS_TYPES[exc.status]}, status_code=exc.status
            )
        except InputError as exc:
            return _error(422, exc)
        except ValidationError as exc:
            return _invalid_response(list(exc.errors()))
        try:
            spec = agent.input_spec
        except NotRunningError as exc:
            return _error(503, exc, {"Retry-After": "1"})
        try:
            answer = await agent.infer(_decode(req, spec), tag=req.tag, priority=req.priority)
        except InputError as exc:
            return _error(422, exc)
        except CloudBusyError as exc:
            retry_s = max(1, math.ceil((exc.retry_after_ms or 1000) / 1000))
            return _error(503, exc, {"Retry-After": str(retry_s)})
        except OutboxStorageFullError as exc:
            # Not "busy": nothing frees this disk by itself within a second.
            return _error(507, exc, {"Retry-After": _FULL_RETRY_AFTER_S})
        except (
            NotRunningError,
            OverloadedError,
            BrokerError,
            CloudUnavailableError,
            OutboxError,
            OutboxEvictedError,
        ) as exc:
            return _error(503, exc, {"Retry-After": "1"})
        except CloudTimeoutError as exc:
            return _error(504, exc)
        except CloudFailedError as exc:
            return _error(502, exc)
        except AgentError as exc:
            return _error(500, exc)
        return JSONResponse({k: _finite(v) for k, v in answer.to_dict().items()})

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return agent.info()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        failed = agent.failed
        body = {
            "ready": agent.ready,
            "model": agent.model_ready,
            "mqtt": agent.connected,
            "failed": None if failed is None else failed.message,
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(agent.registry), media_type=CONTENT_TYPE_LATEST)

    return app
