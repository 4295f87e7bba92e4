"""The sync home's repositories as the cloud serves them: whole files and byte ranges,
HEAD, ETags, refused paths, and a real site installing a bundle through them."""

from __future__ import annotations

import http.client
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fogline.cloud_service._sync_http import RangeNotSatisfiableError, parse_range
from fogline.sync import HttpFetcher, HttpSettings, SiteSync
from fogline.sync._fetch import _ConnectionCutError
from tests.cloud_service._sync_stand import SyncStand, sync_stand

pytestmark = pytest.mark.integration


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[SyncStand]:
    with sync_stand(tmp_path, register=False) as s:
        s.home.assign(["site-a"], "tiny", "2")
        yield s


def _edge_target(stand: SyncStand) -> tuple[str, Path]:
    """The URL path and file of ``tiny@2``'s edge model in the catalogue."""
    root = stand.home.repository_dir("catalogue")
    (file,) = (root / "targets" / "tiny" / "2").glob("*.edge.onnx")
    return f"/sync/catalogue/{file.relative_to(root)}", file


def _raw_get(stand: SyncStand, path: str) -> int:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    url = urllib.parse.urlsplit(stand.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# ---------------------------------------------------------------------------- ranges


def test_parse_range_reads_one_range_and_ignores_what_it_may() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-500", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-500", 100) == (0, 99)
    # malformed, several ranges, another unit, reversed: the whole file
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=-", "bytes=a-b"):
        assert parse_range(ignored, 100) is None
    for unsatisfiable in ("bytes=100-", "bytes=500-600", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(unsatisfiable, 100)
    with pytest.raises(RangeNotSatisfiableError):
        parse_range("bytes=-5", 0)


def test_a_repository_file_is_served_whole_with_its_length_and_an_etag(
    stand: SyncStand,
) -> None:
    path, file = _edge_target(stand)
    got = httpx.get(stand.url + path)
    assert got.status_code == 200
    assert got.content == file.read_bytes()
    assert got.headers["content-length"] == str(file.stat().st_size)
    assert got.headers["accept-ranges"] == "bytes"
    etag = got.headers["etag"]
    again = httpx.get(stand.url + path, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    # a metadata file changed in place (the timestamp) gets a new ETag
    timestamp = "/sync/director/metadata/timestamp.json"
    before = httpx.get(stand.url + timestamp).headers["etag"]
    stand.home.assign(["site-a"], "tiny", "1")
    assert httpx.get(stand.url + timestamp).headers["etag"] != before


def test_head_answers_the_headers_of_get_without_a_body(stand: SyncStand) -> None:
    path, file = _edge_target(stand)
    head = httpx.head(stand.url + path)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(file.stat().st_size)
    assert head.headers["etag"] == httpx.get(stand.url + path).headers["etag"]
    ranged = httpx.head(stand.url + path, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["content-length"] == "10"


def test_a_range_request_gets_206_with_that_range(stand: SyncStand) -> None:
    path, file = _edge_target(stand)
    data = file.read_bytes()
    size = len(data)
    for header, first, last in (
        ("bytes=10-19", 10, 19),
        (f"bytes={size - 7}-", size - 7, size - 1),
        ("bytes=-5", size - 5, size - 1),
        (f"bytes=100-{size * 2}", 100, size - 1),
    ):
        got = httpx.get(stand.url + path, headers={"Range": header})
        assert got.status_code == 206, header
        assert got.content == data[first : last + 1]
        assert got.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert got.headers["content-length"] == str(last - first + 1)
    several = httpx.get(stand.url + path, headers={"Range": "bytes=0-1,4-5"})
    assert several.status_code == 200
    assert several.content == data


def test_a_range_past_the_end_gets_416(stand: SyncStand) -> None:
    path, file = _edge_target(stand)
    size = file.stat().st_size
    got = httpx.get(stand.url + path, headers={"Range": f"bytes={size}-"})
    assert got.status_code == 416
    assert got.headers["content-range"] == f"bytes */{size}"


def test_what_is_not_there_is_404_and_no_directory_is_listed(stand: SyncStand) -> None:
    for path in (
        "/sync/catalogue/metadata/99.root.json",
        "/sync/catalogue/metadata",
        "/sync/catalogue/targets/tiny",
        "/sync/keys/anything.pem",
        "/sync/settings.json",
    ):
        assert httpx.get(stand.url + path).status_code == 404, path
    assert httpx.get(stand.url + "/sync/catalogue/metadata/").status_code == 400


# --------------------------------------------------------------------------- attacks


def test_attack_path_traversal_out_of_a_repository_is_refused(stand: SyncStand) -> None:
    keys = stand.home.path / "keys"
    assert any(keys.rglob("*.pem"))
    key_file = next(keys.rglob("*.pem")).relative_to(stand.home.path)
    for path in (
        f"/sync/catalogue/../{key_file}",
        f"/sync/director/metadata/../../{key_file}",
        "/sync/catalogue/../settings.json",
        "/sync/catalogue/%2e%2e/settings.json",
        "/sync/catalogue/%2E%2E%2Fsettings.json",
        "/sync/director/..%2f..%2f.lock",
        "/sync/catalogue//etc/passwd",
        "/sync/catalogue/metadata/.hidden",
        "/sync/catalogue/metadata\\..\\..\\settings.json",
    ):
        status = _raw_get(stand, path)
        assert status in (400, 404), path


def test_attack_a_symbolic_link_out_of_a_repository_is_not_followed(stand: SyncStand) -> None:
    root = stand.home.repository_dir("catalogue")
    os.symlink(stand.home.path / "settings.json", root / "metadata" / "leak.json")
    os.symlink(stand.home.path / "keys", root / "keyring")
    assert httpx.get(stand.url + "/sync/catalogue/metadata/leak.json").status_code in (400, 404)
    key = next((stand.home.path / "keys").rglob("*.pem")).relative_to(stand.home.path / "keys")
    assert httpx.get(f"{stand.url}/sync/catalogue/keyring/{key}").status_code in (400, 404)


# --------------------------------------------------------------------------- a site


class _CutOnce(HttpFetcher):
    """Breaks the first download of a target after its first chunk: the fetcher resumes
    it with a Range request, which the cloud must answer right."""

    def __init__(self) -> None:
        super().__init__(HttpSettings(chunk_bytes=1024))
        self.cut: set[str] = set()

    def _one_request(self, url: str, offset: int, limit: int | None) -> Iterator[bytes]:
        for chunk in super()._one_request(url, offset, limit):
            yield chunk
            if "/targets/" in url and url not in self.cut and url.endswith(".edge.onnx"):
                self.cut.add(url)
                raise _ConnectionCutError("cut by the test")


def test_a_site_installs_a_bundle_through_the_cloud_routes_resuming_a_cut_download(
    stand: SyncStand,
) -> None:
    fetcher = _CutOnce()
    site = SiteSync(
        stand.sites["site-a"].state,
        catalogue_url=f"{stand.url}/sync/catalogue",
        director_url=f"{stand.url}/sync/director",
        agent_version="0.1.0",
        onnxruntime="1.32.0",
        fetcher=fetcher,
    )
    got = site.update()
    assert got is not None
    assert got.id == "tiny@2"
    edge = got.path / "edge.onnx"
    assert edge.stat().st_size == got.files["edge.onnx"].length
    _, served = _edge_target(stand)
    assert edge.read_bytes() == served.read_bytes()
    assert fetcher.resumes == 1
    assert fetcher.cut
