"""Fetchers: how python-tuf's ``Updater`` reaches a repository.

:class:`HttpFetcher` downloads over HTTP(S) with the standard library: it never reads more
than the signed length plus one byte (so an endless answer is cut there and refused), and
a connection that breaks mid-file is resumed with a ``Range`` request where the server
honours one. :class:`MemoryFetcher` serves files from memory, for tests and for one-box
setups where the repository lives in the same process.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Protocol

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

__all__ = ["HttpFetcher", "HttpSettings", "MemoryFetcher"]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class HttpSettings:
    """How :class:`HttpFetcher` downloads: the socket timeout of each read, how many times
    one file may be resumed after a broken connection, and the read size."""

    timeout_s: float = 30.0
    max_resumes: int = 5
    chunk_bytes: int = 64 * 1024
    user_agent: str = "fogline-sync"

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_resumes < 0:
            raise ValueError(f"max_resumes must be >= 0, got {self.max_resumes}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")


class _ConnectionCutError(Exception):
    """The connection broke before the whole answer arrived."""


class HttpFetcher(FetcherInterface):
    """python-tuf fetcher over urllib, with a hard cut at the length and Range resume."""

    def __init__(self, settings: HttpSettings | None = None) -> None:
        self.settings = settings or HttpSettings()
        # No proxy from the environment: a site's repository address is configured, not
        # inherited; urllib's default handlers are kept otherwise.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.resumes = 0
        """Broken connections resumed so far."""
        self.bytes_read = 0
        """Body bytes read from the network so far (skipped ones included)."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._stream(url, limit=None)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """``url`` into a temporary file; more than ``max_length`` bytes is refused after
        reading at most one byte past it."""
        with tempfile.TemporaryFile() as out:
            try:
                received = self._copy(url, max_length, out)
            except tuf_exceptions.DownloadError:
                raise
            except Exception as exc:
                raise tuf_exceptions.DownloadError(f"failed to download {url}: {exc}") from exc
            if received > max_length:
                raise tuf_exceptions.DownloadLengthMismatchError(
                    f"{url}: more than the allowed {max_length} bytes"
                )
            out.seek(0)
            yield out

    def _copy(self, url: str, max_length: int, out: IO[bytes]) -> int:
        """Copy at most ``max_length + 1`` bytes of ``url`` to ``out``; the count."""
        received = 0
        for chunk in self._stream(url, limit=max_length + 1):
            received += len(chunk)
            if received > max_length:
                break
            out.write(chunk)
        return received

    def _stream(self, url: str, limit: int | None) -> Iterator[bytes]:
        """The body of ``url``, at most ``limit`` bytes, resumed after broken connections."""
        received = 0
        resumes_left = self.settings.max_resumes
        while True:
            try:
                for chunk in self._one_request(url, received, limit):
                    received += len(chunk)
                    yield chunk
                return
            except _ConnectionCutError as cut:
                if resumes_left <= 0:
                    raise tuf_exceptions.DownloadError(
                        f"{url}: connection broke after {received} bytes, "
                        f"{self.settings.max_resumes} resumes used: {cut}"
                    ) from None
                resumes_left -= 1
                self.resumes += 1

    def _one_request(self, url: str, offset: int, limit: int | None) -> Iterator[bytes]:
        headers = {"User-Agent": self.settings.user_agent}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        if not url.startswith(("http://", "https://")):
            raise tuf_exceptions.DownloadError(f"{url}: only http and https URLs are fetched")
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked)
        try:
            response = self._opener.open(request, timeout=self.settings.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise tuf_exceptions.DownloadHTTPError(f"{url}: {exc.reason}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if offset:
                raise _ConnectionCutError(str(exc)) from None
            raise tuf_exceptions.DownloadError(f"{url}: {exc}") from None
        with response:
            skip, total = self._position(response, url, offset)
            got = offset
            while limit is None or got < limit:
                want = self.settings.chunk_bytes
                if limit is not None:
                    want = min(want, limit - got + skip)
                try:
                    data = response.read(want)
                except (OSError, http.client.HTTPException) as exc:
                    raise _ConnectionCutError(str(exc) or type(exc).__name__) from None
                self.bytes_read += len(data)
                if not data:
                    if total is not None and got < total:
                        raise _ConnectionCutError(f"{got} of {total} bytes")
                    return
                if skip:
                    dropped = min(skip, len(data))
                    skip -= dropped
                    data = data[dropped:]
                    if not data:
                        continue
                if limit is not None:
                    data = data[: limit - got]
                got += len(data)
                yield data

    @staticmethod
    def _position(
        response: http.client.HTTPResponse, url: str, offset: int
    ) -> tuple[int, int | None]:
        """(bytes to drop from the body, total length if known) for a (resumed) answer."""
        length = response.headers.get("Content-Length")
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                raise tuf_exceptions.DownloadError(f"{url}: resumed at the wrong offset")
            total = match.group(3)
            return 0, None if total == "*" else int(total)
        # A server that ignores Range sends the whole body again: what arrived is skipped.
        total_length = int(length) if length is not None and length.isdigit() else None
        return offset, total_length


class _Readable(Protocol):
    def read(self, path: str) -> bytes | None: ...


class MemoryFetcher(FetcherInterface):
    """Serves repositories from memory: a store mounted at a base URL (``mount``) is read
    at each request, so a change to it is seen by the next refresh; ``files`` (URL →
    bytes, or URL → a function returning chunks) answers first. Any other URL is an HTTP
    404, as a repository answers for a root version not made."""

    def __init__(self) -> None:
        self.files: dict[str, bytes | Callable[[], Iterator[bytes]]] = {}
        self._mounts: dict[str, _Readable] = {}
        self.requested: list[str] = []

    def mount(self, base_url: str, store: _Readable) -> None:
        """Serve ``store`` (relative path → bytes) under ``base_url``."""
        self._mounts[base_url.rstrip("/") + "/"] = store

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requested.append(url)
        body: bytes | Callable[[], Iterator[bytes]] | None = self.files.get(url)
        if body is None:
            for base, store in self._mounts.items():
                if url.startswith(base):
                    body = store.read(url[len(base) :])
                    break
        if body is None:
            raise tuf_exceptions.DownloadHTTPError(f"{url}: not found", 404)
        if callable(body):
            return body()
        return iter([body])
