"""A site syncing over real HTTP: both repositories served from their directories by
``http.server`` on 127.0.0.1, a connection cut mid-file and resumed with ``Range``, and an
answer that never ends cut at the signed length."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exceptions

from fogline.sync import (
    FetchError,
    HttpFetcher,
    HttpSettings,
    OversizedError,
    Platform,
    SiteSync,
    SyncHome,
    enroll,
)

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Served:
    """What the server does and saw: files cut once after ``cut_after`` bytes, files that
    never end, whether it honours Range, and the requests with their Range headers."""

    root: Path
    cut_once: dict[str, int] = field(default_factory=dict)
    endless: set[str] = field(default_factory=set)
    honour_range: bool = True
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            with served.lock:
                served.requests.append((path, self.headers.get("Range")))
                cut = served.cut_once.pop(path, None)
            if path in served.endless:
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"x" * 65536)
                except OSError:
                    return
            file = (served.root / path).resolve()
            if served.root.resolve() not in file.parents or not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            start = 0
            match = _RANGE.match(self.headers.get("Range") or "")
            if match and served.honour_range:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if cut is not None:
                self.wfile.write(body[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def published(tmp_path: Path, tiny_bundle: Path) -> tuple[SyncHome, Path]:
    home = SyncHome.init(tmp_path / "home", site_bins_bits=4)
    release = home.publish(
        tiny_bundle,
        name="tiny",
        version="1",
        platform=Platform("1.20"),
        regions=("eu",),
        min_agent_version="0.1",
    )
    home.assign(["site-a"], release.name, release.version)
    state = tmp_path / "site"
    enroll(state, home.root_file("catalogue"), home.root_file("director"), "site-a", "eu")
    return home, state


@pytest.fixture
def server(published: tuple[SyncHome, Path]) -> Iterator[tuple[Served, str]]:
    served = Served(root=published[0].path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def site_over_http(state: Path, base: str, fetcher: HttpFetcher) -> SiteSync:
    return SiteSync(
        state,
        catalogue_url=f"{base}/catalogue",
        director_url=f"{base}/director",
        agent_version="0.1.0",
        onnxruntime="1.32.0",
        fetcher=fetcher,
    )


def artifact(home: SyncHome, filename: str) -> str:
    catalogue = home.catalogue()
    release = catalogue.get("tiny", "1")
    assert release is not None
    sha256 = catalogue.manifest(release)["files"][filename]["sha256"]
    return f"catalogue/targets/tiny/1/{sha256}.{filename}"


def test_a_site_syncs_over_http(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    served, base = server
    got = site_over_http(published[1], base, HttpFetcher()).update()
    assert got is not None
    assert got.id == "tiny@1"
    assert (got.path / "edge.onnx").stat().st_size == got.files["edge.onnx"].length
    assert all(r is None for _, r in served.requests)


def test_a_download_cut_mid_file_resumes_with_range(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    served, base = server
    path = artifact(published[0], "edge.onnx")
    served.cut_once[path] = 1000
    fetcher = HttpFetcher(HttpSettings(chunk_bytes=512))
    got = site_over_http(published[1], base, fetcher).update()
    assert got is not None
    assert fetcher.resumes == 1
    assert [r for p, r in served.requests if p == path] == [None, "bytes=1000-"]


def test_a_resume_answered_with_the_whole_file_skips_what_arrived(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    served, base = server
    served.honour_range = False
    path = artifact(published[0], "edge.onnx")
    served.cut_once[path] = 1000
    fetcher = HttpFetcher(HttpSettings(chunk_bytes=300))
    got = site_over_http(published[1], base, fetcher).update()
    assert got is not None
    assert fetcher.resumes == 1


def test_a_connection_that_keeps_breaking_is_a_fetch_error(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    served, base = server
    path = artifact(published[0], "edge.onnx")
    fetcher = HttpFetcher(HttpSettings(max_resumes=0))
    served.cut_once[path] = 100
    with pytest.raises(FetchError, match="connection broke after 100 bytes"):
        site_over_http(published[1], base, fetcher).update()


def test_attack_endless_answer_over_http_is_cut_at_the_signed_length(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    served, base = server
    path = artifact(published[0], "edge.onnx")
    served.endless.add(path)
    site = site_over_http(published[1], base, HttpFetcher())
    with pytest.raises(OversizedError, match="more than the allowed"):
        site.update()
    assert not (published[1] / "bundles" / "tiny" / "1").exists()


def test_the_http_fetcher_reads_at_most_one_byte_past_the_allowed_length(
    published: tuple[SyncHome, Path], server: tuple[Served, str]
) -> None:
    _, base = server
    url = f"{base}/{artifact(published[0], 'edge.onnx')}"
    fetcher = HttpFetcher()
    with (
        pytest.raises(tuf_exceptions.DownloadLengthMismatchError),
        fetcher.download_file(url, 1000),
    ):
        pass
    assert fetcher.bytes_read == 1001
    with fetcher.download_file(url, 10_000) as whole:
        assert (
            len(whole.read())
            == (published[0].path / artifact(published[0], "edge.onnx")).stat().st_size
        )


def test_no_server_is_a_fetch_error(published: tuple[SyncHome, Path]) -> None:
    site = site_over_http(published[1], "http://127.0.0.1:9", HttpFetcher())
    with pytest.raises(FetchError):
        site.update()


def test_only_http_urls_are_fetched(published: tuple[SyncHome, Path]) -> None:
    site = site_over_http(published[1], f"file://{published[0].path}", HttpFetcher())
    with pytest.raises(FetchError, match="only http and https"):
        site.update()
