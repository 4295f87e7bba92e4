"""The cloud's inference API: the Open Inference Protocol (KServe V2) over HTTP.

A thin adapter over a :class:`~fogline.cloud_service._serving.ModelProvider`: it reads the
raw body (so the binary tensor data extension works), checks the caller's bearer token and
the size limit, lets :mod:`._oip` decode and validate, hands the arrays to
``provider.infer(..., lane=Lane.INTERACTIVE)`` and encodes the answer. Errors are
``{"error": "…"}`` with the status codes Triton uses; the mapping from
:mod:`fogline.cloud_service.errors` to HTTP lives here and only here
(:func:`http_status_for`).

Routes: ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2/models/{model}[/versions/{version}]``,
``GET /v2/models/{model}[/versions/{version}]/ready`` and
``POST /v2/models/{model}[/versions/{version}]/infer``; ``/openapi.json`` describes them.
See ``docs/inference-api.md``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from fogline.cloud_service._auth import Scope, TokenStore
from fogline.cloud_service._oip import (
    BINARY_HEADER,
    EncodedResponse,
    InferenceRequest,
    encode_inference_response,
    model_metadata_json,
    parse_header_length,
    parse_inference_request,
    server_metadata_json,
)
from fogline.cloud_service._serving import Lane, ModelMetadata, ModelProvider
from fogline.cloud_service._version import fogline_version
from fogline.cloud_service.errors import (
    BackendError,
    CloudDataError,
    CloudError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "EXTENSIONS", "create_inference_app", "http_status_for"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
EXTENSIONS: tuple[str, ...] = ("binary_tensor_data",)
# Bodies or results above this are decoded and encoded in a worker thread, so one large
# request does not hold up every other request on the event loop.
_THREAD_THRESHOLD_BYTES = 256 * 1024
_BEARER_REALM = 'Bearer realm="fogline"'
_SECURITY_SCHEME = "bearerAuth"


class _ApiError(Exception):
    """An HTTP answer decided in this module (auth, limits, encodings)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def http_status_for(exc: CloudError) -> tuple[int, dict[str, str]]:
    """The HTTP status (and extra headers) that answers ``exc``, as Triton answers it.

    Unknown model or version 404; a request that does not fit 400; a backend failure 500;
    overload, a model not ready and a missed deadline 503 (queue full with
    ``Retry-After``, in whole seconds).
    """
    if isinstance(exc, UnknownModelError):
        return 404, {}
    if isinstance(exc, CloudDataError):
        return 400, {}
    if isinstance(exc, BackendError):
        return 500, {}
    if isinstance(exc, QueueFullError):
        return 503, {"Retry-After": str(max(1, math.ceil(exc.retry_after_ms / 1000)))}
    # ModelNotReadyError, DeadlineExceededError, and any other overloaded or failed part.
    return 503, {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# -- schema for the OpenAPI document (documentation only: bodies are parsed by _oip) ---

_Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class ErrorResponse(BaseModel):
    error: str


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class NotReadyResponse(BaseModel):
    ready: bool
    error: str


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class ModelNotReadyResponse(BaseModel):
    name: str
    ready: bool
    error: str


class MetadataTensor(BaseModel):
    name: str
    datatype: _Datatype
    shape: list[int] = Field(description="-1 marks a dynamic axis (the batch axis included).")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: _Datatype
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size: bytes of this tensor after the JSON header."
    )
    data: list[Any] | None = Field(
        default=None, description="Row-major elements, flat or nested; absent for binary data."
    )


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: true to receive this output as binary data."
    )


class InferenceRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="binary_data_output (bool), timeout_ms (ms), timeout (µs, as Triton).",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: _Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponseBody(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Malformed request, or inputs that do not fit the model.",
        401: "Missing or invalid bearer token.",
        403: "The token lacks the scope this endpoint needs.",
        404: "Unknown model or version.",
        413: "Request body over the size limit.",
        415: "Unsupported Content-Encoding.",
        500: "The model's backend failed.",
        503: "Not ready, queue full (see Retry-After) or deadline exceeded.",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


_AUTH_ERRORS = (401, 403)


# -- the app ----------------------------------------------------------------------------


def create_inference_app(
    provider: ModelProvider,
    *,
    auth: TokenStore | None,
    insecure_no_auth: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    cors_origins: tuple[str, ...] = (),
    registry: CollectorRegistry | None = None,
    server_name: str = "fogline",
    server_version: str | None = None,
) -> FastAPI:
    """The Open Inference Protocol API over ``provider``.

    ``auth`` holds the accepted tokens (see :func:`~._auth.load_token_store`); with
    ``auth=None`` the API refuses to start unless ``insecure_no_auth=True``, which opens
    every endpoint to anyone (logged as a warning). Health endpoints never need a token.
    ``max_request_bytes`` bounds a request body, compressed and decompressed alike.
    ``cors_origins`` enables CORS for exactly those origins (off when empty).
    ``fogline_http_requests_total{route,status}`` is counted in ``registry`` (a fresh one
    if ``None``, reachable as ``app.state.metrics_registry``); the app serves no
    ``/metrics`` itself. ``server_version`` defaults to the installed fogline version.
    """
    if server_version is None:
        server_version = fogline_version()
    if auth is None and not insecure_no_auth:
        raise ValueError(
            "the inference API needs a token store (auth=...); pass insecure_no_auth=True "
            "to open it to anyone"
        )
    if auth is not None and insecure_no_auth:
        raise ValueError("pass either a token store or insecure_no_auth=True, not both")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    for origin in cors_origins:
        if not isinstance(origin, str) or not origin:
            raise ValueError(f"CORS origins must be non-empty strings, got {origin!r}")
    if insecure_no_auth:
        _log.warning(
            "AUTHENTICATION IS OFF (insecure_no_auth): anyone who can reach this API can "
            "read model metadata and run inference. Use this only for local experiments; "
            "configure a token file for anything else."
        )

    registry = registry if registry is not None else CollectorRegistry()
    requests_total = Counter(
        "fogline_http_requests",
        "HTTP requests answered by the inference API, by route template and status code.",
        ["route", "status"],
        registry=registry,
    )
    limit = max_request_bytes

    app = FastAPI(
        title="fogline inference API",
        summary="Open Inference Protocol (KServe V2) REST API with the binary tensor data "
        "extension.",
        version=server_version,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics_registry = registry

    def require(scope: Scope) -> Callable[[Request], Awaitable[None]]:
        # Async (though it never awaits): a plain ``def`` dependency would cost every
        # request a hop through the thread pool for a microsecond hash.
        async def check(request: Request) -> None:
            if auth is None:
                return
            header = request.headers.get("authorization")
            if not header:
                raise _ApiError(
                    401,
                    "this endpoint needs a bearer token (Authorization: Bearer <token>)",
                    {"WWW-Authenticate": _BEARER_REALM},
                )
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise _ApiError(
                    401,
                    "the Authorization header must read 'Bearer <token>'",
                    {"WWW-Authenticate": f'{_BEARER_REALM}, error="invalid_request"'},
                )
            entry = auth.authenticate(token)
            if entry is None:
                raise _ApiError(
                    401,
                    "the bearer token is not valid",
                    {"WWW-Authenticate": f'{_BEARER_REALM}, error="invalid_token"'},
                )
            if not entry.allows(scope):
                raise _ApiError(
                    403,
                    f"token {entry.name!r} lacks the {scope.value!r} scope",
                    {
                        "WWW-Authenticate": (
                            f'{_BEARER_REALM}, error="insufficient_scope", scope="{scope.value}"'
                        )
                    },
                )
            request.state.token_name = entry.name

        return check

    app.state.require_scope = require
    can_read = [Depends(require(Scope.READ))]
    can_infer = [Depends(require(Scope.INFER))]
    secured: dict[str, Any] = {} if auth is None else {"security": [{_SECURITY_SCHEME: []}]}
    auth_errors = () if auth is None else _AUTH_ERRORS

    # -- errors --

    @app.exception_handler(_ApiError)
    async def _on_api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(CloudError)
    async def _on_cloud_error(request: Request, exc: CloudError) -> JSONResponse:
        status, headers = http_status_for(exc)
        if status >= 500 and status != 503:
            _log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(status, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    # -- health (open) --

    @app.get("/v2/health/live", response_model=LiveResponse, tags=["health"])
    def server_live() -> dict[str, Any]:
        """Whether the server is up (always true when it answers)."""
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        response_model=ReadyResponse,
        responses={503: {"model": NotReadyResponse, "description": "Not ready."}},
        tags=["health"],
    )
    def server_ready() -> Any:
        """Whether every model that should be loaded is loaded and warmed up."""
        if provider.ready:
            return {"ready": True}
        return JSONResponse(
            {"ready": False, "error": "the server is not ready: models are still loading"},
            status_code=503,
        )

    # -- metadata (read) --

    @app.get(
        "/v2",
        response_model=ServerMetadataResponse,
        responses=_errors(*auth_errors),
        dependencies=can_read,
        openapi_extra=secured,
        tags=["metadata"],
    )
    def server_metadata() -> dict[str, Any]:
        """Server name, version and the protocol extensions it supports."""
        return server_metadata_json(server_name, server_version, EXTENSIONS)

    def model_ready(model: str, version: str | None) -> Any:
        what = f"model {model!r}" if version is None else f"version {version!r} of model {model!r}"
        try:
            ready = provider.is_ready(model, version)
            reason = f"{what} is not ready"
        except ModelNotReadyError as exc:
            ready, reason = False, str(exc)
        if ready:
            return {"name": model, "ready": True}
        return JSONResponse({"name": model, "ready": False, "error": reason}, status_code=503)

    ready_responses: dict[int | str, dict[str, Any]] = {
        **_errors(*auth_errors, 404),
        503: {"model": ModelNotReadyResponse, "description": "The model is not ready."},
    }

    @app.get(
        "/v2/models/{model}/ready",
        response_model=ModelReadyResponse,
        responses=ready_responses,
        dependencies=can_read,
        openapi_extra=secured,
        tags=["health"],
    )
    def model_ready_default(model: str) -> Any:
        """Whether the model's default version is loaded and warmed up."""
        return model_ready(model, None)

    @app.get(
        "/v2/models/{model}/versions/{version}/ready",
        response_model=ModelReadyResponse,
        responses=ready_responses,
        dependencies=can_read,
        openapi_extra=secured,
        tags=["health"],
    )
    def model_ready_version(model: str, version: str) -> Any:
        """Whether this version of the model is loaded and warmed up."""
        return model_ready(model, version)

    metadata_responses = _errors(*auth_errors, 404, 503)

    @app.get(
        "/v2/models/{model}",
        response_model=ModelMetadataResponse,
        responses=metadata_responses,
        dependencies=can_read,
        openapi_extra=secured,
        tags=["metadata"],
    )
    def model_metadata_default(model: str) -> dict[str, Any]:
        """Inputs, outputs and versions of the model's default version."""
        return model_metadata_json(provider.metadata(model, None))

    @app.get(
        "/v2/models/{model}/versions/{version}",
        response_model=ModelMetadataResponse,
        responses=metadata_responses,
        dependencies=can_read,
        openapi_extra=secured,
        tags=["metadata"],
    )
    def model_metadata_version(model: str, version: str) -> dict[str, Any]:
        """Inputs, outputs and versions of one version of the model."""
        return model_metadata_json(provider.metadata(model, version))

    # -- inference (infer) --

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _ApiError(400, f"Content-Length must be an integer, got {declared!r}")
            if int(declared) > limit:
                raise _ApiError(
                    413, f"the request body is {int(declared)} bytes, over the {limit}-byte limit"
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _ApiError(413, f"the request body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def decode(
        body: bytes, encoding: str | None, header: str | None, metadata: ModelMetadata
    ) -> InferenceRequest:
        body = _decompress(body, encoding, limit)
        return parse_inference_request(
            body, metadata, header_length=parse_header_length(header, len(body))
        )

    async def infer(model: str, version: str | None, request: Request) -> Response:
        metadata = provider.metadata(model, version)
        body = await read_body(request)
        args = (
            body,
            request.headers.get("content-encoding"),
            request.headers.get(BINARY_HEADER),
            metadata,
        )
        parsed = (
            await run_in_threadpool(decode, *args)
            if len(body) > _THREAD_THRESHOLD_BYTES
            else decode(*args)
        )
        # Pinned to the version the inputs were checked against. A provider raises only
        # CloudError (the repository maps whatever a backend raises to BackendError), which
        # the handler above answers; anything else is a bug, which Starlette's error
        # middleware (the request's supervisor) answers 500 and logs with its traceback.
        results = await provider.infer(
            model,
            metadata.version,
            parsed.inputs,
            lane=Lane.INTERACTIVE,
            timeout_ms=parsed.timeout_ms,
        )

        def encode() -> EncodedResponse:
            return encode_inference_response(
                model_name=metadata.name,
                model_version=metadata.version,
                request=parsed,
                results=results,
            )

        out_bytes = sum(getattr(a, "nbytes", 0) for a in results.values())
        encoded = (
            await run_in_threadpool(encode) if out_bytes > _THREAD_THRESHOLD_BYTES else encode()
        )
        headers = {}
        if encoded.header_length is not None:
            headers[BINARY_HEADER] = str(encoded.header_length)
        return Response(encoded.body, media_type=encoded.media_type, headers=headers)

    infer_extra: dict[str, Any] = {
        **secured,
        "parameters": [
            {
                "name": BINARY_HEADER,
                "in": "header",
                "required": False,
                "description": "Length of the JSON header when binary tensors follow it.",
                "schema": {"type": "integer", "minimum": 0},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/InferenceRequestBody"}
                },
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                },
            },
        },
    }
    infer_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Outputs as JSON, or a JSON header of Inference-Header-Content-"
            "Length bytes followed by binary tensors.",
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        **_errors(400, *auth_errors, 404, 413, 415, 500, 503),
    }

    @app.post(
        "/v2/models/{model}/infer",
        response_model=InferenceResponseBody,
        responses=infer_responses,
        dependencies=can_infer,
        openapi_extra=infer_extra,
        tags=["inference"],
    )
    async def infer_default(model: str, request: Request) -> Response:
        """Run the model's default version on the request's inputs."""
        return await infer(model, None, request)

    @app.post(
        "/v2/models/{model}/versions/{version}/infer",
        response_model=InferenceResponseBody,
        responses=infer_responses,
        dependencies=can_infer,
        openapi_extra=infer_extra,
        tags=["inference"],
    )
    async def infer_version(model: str, version: str, request: Request) -> Response:
        """Run one version of the model on the request's inputs."""
        return await infer(model, version, request)

    # -- OpenAPI: the request body models and the bearer scheme, declared by hand --

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        body = InferenceRequestBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas["InferenceRequestBody"] = body
        if auth is not None:
            components["securitySchemes"] = {_SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding", BINARY_HEADER],
            expose_headers=[BINARY_HEADER, "Retry-After"],
        )
    app.add_middleware(_CountRequests, counter=requests_total)
    return app


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its Content-Encoding (gzip or deflate, as ``tritonclient`` sends
    with ``request_compression_algorithm``), never inflated past ``limit`` bytes."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif name == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise _ApiError(
            415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or identity"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _ApiError(400, f"the {name} request body is corrupt: {exc}") from None
    if len(out) > limit:
        raise _ApiError(413, f"the decompressed request body is over the {limit}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise _ApiError(400, f"the {name} request body is truncated or has trailing data")
    return out


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _CountRequests:
    """Counts every answered request by route template (``/v2/models/{model}/infer``, so
    model names cannot blow up the label set; ``unmatched`` for unknown paths) and status.
    A plain ASGI middleware: no per-request task or body buffering."""

    def __init__(
        self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], counter: Counter
    ) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.counter.labels(route=label, status=str(status)).inc()
