"""The sync home's two repositories over HTTP: ``/sync/catalogue/…`` and ``/sync/director/…``.

Plain files, served as they lie in ``<home>/catalogue`` and ``<home>/director`` (a CDN or
an object store could serve the same tree): ``GET`` and ``HEAD``, ``Content-Length``,
``Accept-Ranges: bytes``, an ``ETag`` (size, change time and inode), one byte range per
request (``206`` with ``Content-Range``; ``416`` for a range past the end; a malformed or
multi-range header is ignored and the whole file is sent, as RFC 9110 allows), and
``If-None-Match`` (``304``). No authentication: every byte served is covered by signed
metadata that the site checks (python-tuf), so what a stranger can read is what every site
reads, and a changed byte is refused by the site, not trusted.

A path is checked segment by segment (:func:`fogline.sync.check_target_path`: nothing
absolute, no ``..``, no empty or dot-led segment) before it is joined to a repository
directory, then resolved and held inside it (no symbolic link out); anything else is 400,
and what is not a regular file there (a directory included: no listings) is 404. The range
logic is :func:`parse_range`, pure.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fogline.sync import UnsafePathError, check_target_path

__all__ = ["RangeNotSatisfiableError", "add_sync_file_routes", "parse_range"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 256 * 1024


class RangeNotSatisfiableError(ValueError):
    """A byte range that starts past the end of the file (or asks for none of it)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` a ``Range`` header asks of a file of
    ``size`` bytes, or ``None`` for the whole file (no header, a malformed one, several
    ranges, another unit: all ignored). :class:`RangeNotSatisfiableError` when it asks for
    nothing the file has."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # a suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError(f"bytes=-{suffix} of a {size}-byte file")
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise RangeNotSatisfiableError(f"bytes={first}- of a {size}-byte file")
    return first, min(int(last_text), size - 1) if last_text else size - 1


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _read(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of the open file ``fd`` from ``offset``, in chunks; closes it."""
    try:
        while length > 0:
            chunk = os.pread(fd, min(_CHUNK, length), offset)
            if not chunk:  # the file shrank under us: end the body short
                return
            offset += len(chunk)
            length -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


class _Repository:
    """One repository directory, and the answer for a path in it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _open(self, path: str) -> tuple[int, os.stat_result] | Response:
        try:
            check_target_path(path)
        except UnsafePathError as exc:
            return _refuse(400, str(exc))
        root = self.root.resolve()
        file = (root / path).resolve()
        if root not in file.parents:
            return _refuse(400, f"{path!r} leads out of the repository")
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return _refuse(404, f"no file {path!r}")
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return _refuse(404, f"no file {path!r}")
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _refuse(404, f"no file {path!r}")
        return fd, st

    def answer(self, request: Request, path: str) -> Response:
        opened = self._open(path)
        if isinstance(opened, Response):
            return opened
        fd, st = opened
        size = st.st_size
        etag = _etag(st)
        headers = {"Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "no-cache"}
        head = request.method == "HEAD"
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
            os.close(fd)
            return Response(status_code=304, headers=headers)
        try:
            wanted = parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiableError:
            os.close(fd)
            headers["Content-Range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        status = 200
        first, last = 0, size - 1
        if wanted is not None:
            status = 206
            first, last = wanted
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = last - first + 1
        headers["Content-Length"] = str(length)
        if head:
            os.close(fd)
            return Response(
                status_code=status, headers=headers, media_type="application/octet-stream"
            )
        return StreamingResponse(
            _read(fd, first, length),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )


def add_sync_file_routes(app: FastAPI, catalogue: Path, director: Path) -> None:
    """Serve the two repository directories under ``/sync/catalogue/`` and
    ``/sync/director/`` on ``app`` (open routes: see the module docstring)."""
    for name, root in (("catalogue", catalogue), ("director", director)):
        app.add_api_route(
            f"/sync/{name}/{{path:path}}",
            _route(_Repository(root)),
            methods=["GET", "HEAD"],
            include_in_schema=False,
            response_model=None,
            name=f"sync_{name}",
        )


def _route(repository: _Repository) -> Callable[[Request, str], Response]:
    # Plain ``def``: FastAPI runs it in its thread pool, so opening a file never blocks
    # the event loop; the body is read in chunks as it is sent.
    def serve_file(request: Request, path: str) -> Response:
        return repository.answer(request, path)

    return serve_file
