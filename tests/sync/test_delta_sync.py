"""A site fetches only what changed of what it runs: the manifest and the edge part, a
file it already holds copied, a changed one rebuilt from a signed delta, and every file
checked against the catalogue's signed length and SHA-256. Through memory and through
real HTTP; and what a hostile mirror or a thief of the release key can do with deltas."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import TargetFile

from fogline._bench_delta import fine_tune, int8_model, int8_tensors, replace_tensors
from fogline.compression import make_delta
from fogline.sync import (
    DirectoryStore,
    HttpFetcher,
    Platform,
    Release,
    SiteSync,
    SyncHome,
    TamperedError,
    VerifiedBundle,
    enroll,
    write_manifest,
)
from fogline.sync._catalogue import _hashed_name
from fogline.sync._release import delta_path
from tests.sync.test_http import Served, make_handler

from .conftest import Fleet

TENSORS, TENSOR_BYTES = 20, 4096


def make_bundle(root: Path, edge: bytes, cloud: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "edge.onnx").write_bytes(edge)
    (root / "cloud.onnx").write_bytes(cloud)
    write_manifest(
        root,
        {
            "name": "int8",
            "version": "0",
            "files": {"edge.onnx": {}, "cloud.onnx": {}},
            "edge": {"model": "edge.onnx", "input": "x", "feature_outputs": ["y"]},
            "cloud": {"model": "cloud.onnx", "output": "y"},
        },
    )
    return root


class Models:
    """An edge part and a cloud part of INT8 tensors, changed release by release."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rng = np.random.default_rng(7)
        self.edge = int8_tensors(self.rng, TENSORS, TENSOR_BYTES)
        self.cloud = int8_tensors(self.rng, TENSORS, TENSOR_BYTES)
        self.count = 0

    def bundle(self) -> Path:
        self.count += 1
        return make_bundle(
            self.tmp / f"bundle-{self.count}", int8_model(self.edge), int8_model(self.cloud)
        )

    @property
    def edge_bytes(self) -> bytes:
        return int8_model(self.edge)

    def change(self, what: str) -> None:
        if what == "replace":
            self.edge = replace_tensors(self.edge, (2, 12), self.rng)
        elif what == "finetune":
            self.edge = fine_tune(self.edge, 0.10, self.rng)
        elif what == "cloud_only":
            self.cloud = fine_tune(self.cloud, 0.10, self.rng)
        elif what == "everything":
            self.edge = int8_tensors(self.rng, TENSORS, TENSOR_BYTES)
        else:
            raise ValueError(what)


@pytest.fixture
def models(tmp_path: Path) -> Models:
    return Models(tmp_path / "models")


def release(fleet: Fleet, models: Models, version: int, *, deltas: int = 1) -> Release:
    released = fleet.catalogue.publish(
        models.bundle(),
        name="int8",
        version=str(version),
        regions=("eu",),
        platform=Platform("1.20"),
        min_agent_version="0.1",
        deltas=deltas,
    )
    fleet.director.assign(["site-a"], released)
    return released


def install(site: SiteSync) -> VerifiedBundle:
    got = site.update()
    assert got is not None
    site.record_installed(got)
    return got


@pytest.fixture
def site(fleet: Fleet, models: Models) -> SiteSync:
    """site-a running release 1 of ``int8``."""
    release(fleet, models, 1)
    site = fleet.site()
    install(site)
    fleet.fetcher.requested.clear()
    return site


def model_urls(fleet: Fleet) -> list[str]:
    """The whole model files the site requested (a delta's stored name ends in the name of
    the file it rebuilds, under ``deltas/``)."""
    return [u for u in fleet.fetcher.requested if u.endswith(".onnx") and "/deltas/" not in u]


def edge_sha(got: VerifiedBundle) -> str:
    return hashlib.sha256((got.path / "edge.onnx").read_bytes()).hexdigest()


# --------------------------------------------------------------------- what is fetched


def test_a_first_install_fetches_the_manifest_and_the_edge_part_whole(
    fleet: Fleet, models: Models
) -> None:
    released = release(fleet, models, 1)
    got = install(fleet.site())
    edge = len(models.edge_bytes)
    assert got.bytes_transferred == got.bytes_full == released.length + edge
    assert [u.rsplit(".", 1)[-1] for u in model_urls(fleet)] == ["onnx"]
    assert model_urls(fleet)[0].endswith(".edge.onnx")
    assert not (got.path / "cloud.onnx").exists()
    assert got.files["cloud.onnx"].sha256 == hashlib.sha256(int8_model(models.cloud)).hexdigest()


def test_the_agent_loads_a_synced_bundle_without_its_cloud_part(fleet: Fleet) -> None:
    from fogline.edge_agent._loaded import LoadedBundle

    fleet.release_to(["site-a"])  # the tiny bundle, a real edge and cloud model
    got = install(fleet.site())
    assert not (got.path / "cloud.onnx").exists()
    loaded = LoadedBundle.load(got.path)
    assert loaded.id == "tiny@1"
    assert loaded.bundle.edge_model_path.is_file()


def test_a_cloud_only_change_downloads_no_model_bytes(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    models.change("cloud_only")
    released = release(fleet, models, 2)
    got = install(site)
    assert got.bytes_transferred == released.length  # the manifest, nothing else
    assert got.bytes_full == released.length + len(models.edge_bytes)
    assert model_urls(fleet) == []
    assert not [u for u in fleet.fetcher.requested if "/deltas/" in u]
    assert edge_sha(got) == got.files["edge.onnx"].sha256


@pytest.mark.parametrize("change", ["replace", "finetune"])
def test_a_changed_edge_part_arrives_as_a_delta_of_at_most_15_percent(
    fleet: Fleet, models: Models, site: SiteSync, change: str
) -> None:
    models.change(change)
    released = release(fleet, models, 2)
    got = install(site)
    edge = models.edge_bytes
    assert (got.path / "edge.onnx").read_bytes() == edge
    assert 0 < got.bytes_transferred - released.length <= 0.15 * len(edge)
    assert model_urls(fleet) == []
    assert len([u for u in fleet.fetcher.requested if "/deltas/" in u]) == 1
    assert site.delta_failures == 0


def test_without_deltas_a_changed_edge_part_is_downloaded_whole(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    models.change("finetune")
    released = release(fleet, models, 2, deltas=0)
    assert fleet.catalogue.deltas(released) == []
    got = install(site)
    assert got.bytes_transferred == got.bytes_full
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes


def test_a_delta_is_published_only_when_much_smaller_than_its_file(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    models.change("everything")
    released = release(fleet, models, 2)
    assert fleet.catalogue.deltas(released) == []  # the cloud part did not change either
    got = install(site)
    assert got.bytes_transferred == got.bytes_full


def test_deltas_are_published_to_each_file_from_the_releases_asked_for(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    """A site that skipped release 2 rebuilds release 3 from the release 1 it holds."""
    models.change("finetune")
    fleet.catalogue.publish(
        models.bundle(),
        name="int8",
        version="2",
        regions=("eu",),
        platform=Platform("1.20"),
        min_agent_version="0.1",
    )
    models.change("cloud_only")
    models.change("replace")
    released = release(fleet, models, 3, deltas=2)
    deltas = fleet.catalogue.deltas(released)
    # Releases 1 and 2 share their cloud part: one delta from it.
    assert sorted(d.file for d in deltas) == ["cloud.onnx", "edge.onnx", "edge.onnx"]
    assert all(d.length <= 0.8 * d.result_length for d in deltas)
    got = install(site)
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert got.bytes_transferred - released.length <= 0.25 * len(models.edge_bytes)
    assert model_urls(fleet) == []


def test_a_held_file_that_changed_on_disk_is_not_copied(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    held = site.state_dir / "bundles" / "int8" / "1" / "edge.onnx"
    data = bytearray(held.read_bytes())
    data[-10] ^= 0xFF
    held.write_bytes(bytes(data))
    models.change("cloud_only")
    release(fleet, models, 2)
    got = install(site)
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert got.bytes_transferred == got.bytes_full
    assert len(model_urls(fleet)) == 1


# ------------------------------------------------------------------------------ attacks


def stored_delta(fleet: Fleet, released: Release, filename: str) -> str:
    (delta,) = [d for d in fleet.catalogue.deltas(released) if d.file == filename]
    entry = fleet.writers["catalogue"].targets().targets[delta.path]
    return _hashed_name(delta.path, entry.hashes["sha256"])


def sign_delta(
    fleet: Fleet, released: Release, base_sha256: str, data: bytes, *, result_length: int
) -> None:
    """A delta entry for ``edge.onnx`` from ``base_sha256``, signed with the release key
    (a thief of it, or a broken publisher), whose bytes are ``data``."""
    file = fleet.catalogue.manifest(released)["files"]["edge.onnx"]
    path = delta_path(released.name, released.version, "edge.onnx", base_sha256)
    sha = hashlib.sha256(data).hexdigest()
    fleet.stores["catalogue"].write(_hashed_name(path, sha), data)
    writer = fleet.writers["catalogue"]
    with writer.edit_targets() as targets:
        targets.targets[path] = TargetFile(
            len(data),
            {"sha256": sha},
            path,
            {
                "custom": {
                    "fogline": {
                        "kind": "delta",
                        "bundle": released.id,
                        "file": "edge.onnx",
                        "base": base_sha256,
                        "result": file["sha256"],
                        "result_length": result_length,
                    }
                }
            },
        )
    writer.commit()


def test_attack_tampered_delta_is_refused(
    fleet: Fleet, models: Models, site: SiteSync, caplog: pytest.LogCaptureFixture
) -> None:
    models.change("finetune")
    released = release(fleet, models, 2)
    stored = stored_delta(fleet, released, "edge.onnx")
    data = bytearray(fleet.stores["catalogue"].files[stored])
    data[len(data) // 2] ^= 0x01
    fleet.stores["catalogue"].files[stored] = bytes(data)
    with caplog.at_level(logging.WARNING, logger="fogline.sync._client"):
        got = install(site)
    assert "not used" in caplog.text
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert site.delta_failures == 1
    assert len(model_urls(fleet)) == 1  # the whole file, verified
    assert got.bytes_transferred == got.bytes_full + len(data)


def test_attack_tampered_delta_and_file_fail_verified_and_install_nothing(
    fleet: Fleet, models: Models, site: SiteSync
) -> None:
    models.change("finetune")
    released = release(fleet, models, 2)
    files = fleet.stores["catalogue"].files
    stored = stored_delta(fleet, released, "edge.onnx")
    files[stored] = files[stored][:-1] + bytes([files[stored][-1] ^ 1])
    sha = fleet.catalogue.manifest(released)["files"]["edge.onnx"]["sha256"]
    whole = _hashed_name("int8/2/edge.onnx", sha)
    files[whole] = files[whole][:-1] + bytes([files[whole][-1] ^ 1])
    with pytest.raises(TamperedError):
        site.update()
    assert not (site.state_dir / "bundles" / "int8" / "2").exists()
    assert site.installed_releases() == {"int8": 1}


def test_attack_delta_for_another_base(
    fleet: Fleet, models: Models, site: SiteSync, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed delta entry says it applies to the site's file, but its bytes were made
    from another one: the delta names its own base, and it is not the site's."""
    held = models.edge_bytes
    models.change("finetune")
    released = release(fleet, models, 2, deltas=0)
    other = int8_model(fine_tune(models.edge, 0.05, np.random.default_rng(99)))
    sign_delta(
        fleet,
        released,
        hashlib.sha256(held).hexdigest(),
        make_delta(other, models.edge_bytes),
        result_length=len(models.edge_bytes),
    )
    with caplog.at_level(logging.WARNING, logger="fogline.sync._client"):
        got = install(site)
    assert "applies to a file with sha256" in caplog.text
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert site.delta_failures == 1
    assert len(model_urls(fleet)) == 1


def test_attack_delta_result_larger_than_signed_length(
    fleet: Fleet, models: Models, site: SiteSync, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed delta entry claims the signed length, but the delta would rebuild far more
    (a decompression bomb): refused from its header, before anything is decompressed."""
    held = models.edge_bytes
    models.change("finetune")
    released = release(fleet, models, 2, deltas=0)
    bomb = make_delta(held, models.edge_bytes + bytes(4 << 20))
    sign_delta(
        fleet,
        released,
        hashlib.sha256(held).hexdigest(),
        bomb,
        result_length=len(models.edge_bytes),
    )
    with caplog.at_level(logging.WARNING, logger="fogline.sync._client"):
        got = install(site)
    assert f"more than the allowed {len(models.edge_bytes)}" in caplog.text
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert site.delta_failures == 1


def test_attack_delta_entry_for_another_file_is_not_used(
    fleet: Fleet, models: Models, site: SiteSync, caplog: pytest.LogCaptureFixture
) -> None:
    held = models.edge_bytes
    models.change("finetune")
    released = release(fleet, models, 2, deltas=0)
    sign_delta(
        fleet,
        released,
        hashlib.sha256(held).hexdigest(),
        make_delta(held, models.edge_bytes),
        result_length=len(models.edge_bytes) + 1,
    )
    with caplog.at_level(logging.WARNING, logger="fogline.sync._client"):
        got = install(site)
    assert "result_length" in caplog.text
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes


# -------------------------------------------------------------------------- over HTTP


@pytest.fixture
def http_home(tmp_path: Path) -> Iterator[tuple[SyncHome, Served, str]]:
    home = SyncHome.init(tmp_path / "home", site_bins_bits=4)
    served = Served(root=home.path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield home, served, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def http_release(home: SyncHome, models: Models, version: int) -> Release:
    released = home.publish(
        models.bundle(),
        name="int8",
        version=str(version),
        platform=Platform("1.20"),
        regions=("eu",),
        min_agent_version="0.1",
    )
    home.assign(["site-a"], "int8", str(version))
    return released


def http_site(tmp_path: Path, home: SyncHome, base: str) -> SiteSync:
    state = tmp_path / "site"
    if not state.exists():
        enroll(state, home.root_file("catalogue"), home.root_file("director"), "site-a", "eu")
    return SiteSync(
        state,
        catalogue_url=f"{base}/catalogue",
        director_url=f"{base}/director",
        agent_version="0.1.0",
        onnxruntime="1.32.0",
        fetcher=HttpFetcher(),
    )


@pytest.mark.integration
def test_over_http_a_cloud_only_change_downloads_no_model_bytes_and_a_fine_tune_a_delta(
    tmp_path: Path, models: Models, http_home: tuple[SyncHome, Served, str]
) -> None:
    home, served, base = http_home
    http_release(home, models, 1)
    site = http_site(tmp_path, home, base)
    install(site)
    served.requests.clear()
    models.change("cloud_only")
    released = http_release(home, models, 2)
    got = install(site)
    assert got.bytes_transferred == released.length
    assert not [p for p, _ in served.requests if p.endswith(".onnx")]
    served.requests.clear()
    models.change("finetune")
    released = http_release(home, models, 3)
    got = install(site)
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert [p for p, _ in served.requests if "/deltas/" in p]
    assert not [p for p, _ in served.requests if p.endswith(".onnx") and "/deltas/" not in p]
    assert got.bytes_transferred - released.length <= 0.15 * len(models.edge_bytes)


@pytest.mark.integration
def test_attack_tampered_delta_on_a_mirror_is_refused_over_http(
    tmp_path: Path, models: Models, http_home: tuple[SyncHome, Served, str]
) -> None:
    home, served, base = http_home
    http_release(home, models, 1)
    site = http_site(tmp_path, home, base)
    install(site)
    models.change("finetune")
    released = http_release(home, models, 2)
    (delta,) = [d for d in home.catalogue().deltas(released) if d.file == "edge.onnx"]
    store = DirectoryStore(home.path / "catalogue")
    entry = home.catalogue().writer.targets().targets[delta.path]
    stored = _hashed_name(delta.path, entry.hashes["sha256"])
    data = store.read(stored)
    assert data is not None
    store.write(stored, data[:100] + bytes([data[100] ^ 0x80]) + data[101:])
    served.requests.clear()
    got = install(site)
    assert (got.path / "edge.onnx").read_bytes() == models.edge_bytes
    assert site.delta_failures == 1
    assert [p for p, _ in served.requests if p.endswith(".onnx") and "/deltas/" not in p]


# ---------------------------------------------------------------------------- the CLI


def test_bundle_publish_lists_its_deltas_and_publishes_none_with_no_deltas(
    tmp_path: Path, models: Models
) -> None:
    from tests.sync.test_cli import ok_json

    home = tmp_path / "home"
    ok_json("keys", "init", "--home", str(home), "--site-bins-bits", "4")
    common = ("--name", "int8", "--region", "eu", "--onnxruntime", "1.20", "--home", str(home))
    first = ok_json("bundle", "publish", str(models.bundle()), "--version", "1", *common)
    assert first["deltas"] == []
    models.change("finetune")
    second = ok_json("bundle", "publish", str(models.bundle()), "--version", "2", *common)
    (delta,) = second["deltas"]
    assert delta["file"] == "edge.onnx"
    assert delta["bytes"] <= 0.15 * delta["file_bytes"]
    models.change("finetune")
    third = ok_json(
        "bundle", "publish", str(models.bundle()), "--version", "3", "--no-deltas", *common
    )
    assert third["deltas"] == []
    assert not list((home / "catalogue" / "targets" / "int8" / "3").glob("deltas"))
