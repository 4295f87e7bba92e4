"""The rollout service's HTTP routes: a nonce per status report, and the reports.

``GET /v1/sync/sites/{site}/nonce`` answers ``{"nonce": …}`` for a registered site (404
for another); ``POST /v1/sync/reports`` takes one signed status report (the DSSE envelope
of :func:`fogline.sync.make_status_report`, at most :data:`MAX_REPORT_BYTES`; 413 above)
and answers 202 with its site and phase once it is verified with the site's registered
key, its nonce used up and what it says stored. A report that is not verified is refused
and stores nothing: 400 naming the problem (a bad signature, a malformed report, an
unknown site), 409 for a nonce already used or never issued (a replay). A fleet store
that cannot be reached answers 503; the request fails, the server goes on.

Open routes, as the repositories are: a nonce is worth nothing without the site's key,
and a report is believed only when that key signed it.

The sync package's errors become HTTP statuses in one place, :func:`status_for`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fogline.sync import (
    ReplayedReportError,
    ReportError,
    RolloutError,
    RolloutService,
    StorageError,
    SyncError,
    VerificationError,
)

__all__ = ["MAX_REPORT_BYTES", "add_sync_api_routes", "status_for"]

#: The largest status report accepted: a report is a few hundred bytes of JSON.
MAX_REPORT_BYTES = 64 * 1024

# Most specific first: the first class an error is an instance of decides.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ReplayedReportError, 409),
    (ReportError, 400),
    (VerificationError, 400),
    (RolloutError, 404),  # the only one these routes meet: a site not registered
    (StorageError, 503),
    (SyncError, 503),
    (ValueError, 400),  # a name that is no site name (check_name)
)


def status_for(exc: BaseException) -> int | None:
    """The HTTP status of an error the rollout service raised, or ``None`` for one these
    routes do not expect (the server's supervisor answers it 500 and counts it)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _mapped(exc: Exception) -> JSONResponse:
    status = status_for(exc)
    if status is None:
        raise exc
    return _error(status, str(exc))


class _TooLargeError(Exception):
    pass


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused once it passes ``limit`` bytes (before reading more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLargeError
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLargeError
        parts.append(chunk)
    return b"".join(parts)


def add_sync_api_routes(
    app: FastAPI, service: RolloutService, *, max_report_bytes: int = MAX_REPORT_BYTES
) -> None:
    """Add the nonce and report routes over ``service`` to ``app``."""

    # Plain ``def``: the store is read in FastAPI's thread pool, not on the event loop.
    def nonce(site: str) -> Any:
        try:
            return {"nonce": service.issue_nonce(site)}
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised by _mapped
            return _mapped(exc)

    async def report(request: Request) -> Any:
        try:
            data = await _body(request, max_report_bytes)
        except _TooLargeError:
            return _error(413, f"a status report is at most {max_report_bytes} bytes")
        try:
            received = await run_in_threadpool(service.receive_report, data)
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised by _mapped
            return _mapped(exc)
        return JSONResponse({"site": received.site, "phase": received.phase}, status_code=202)

    app.add_api_route(
        "/v1/sync/sites/{site}/nonce",
        nonce,
        methods=["GET"],
        include_in_schema=False,
        response_model=None,
    )
    app.add_api_route(
        "/v1/sync/reports", report, methods=["POST"], include_in_schema=False, response_model=None
    )
