"""Enrolling a site, and what a site's refresh does when its own disk fails."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fogline.sync import (
    MetadataError,
    SignatureError,
    SiteIdentity,
    SiteSync,
    StorageError,
    enroll,
    generate_key,
)

from .conftest import CATALOGUE_URL, DIRECTOR_URL, Fleet, resign_root


def test_enrolment_writes_the_site_and_its_key(fleet: Fleet, tmp_path: Path) -> None:
    identity = enroll(
        tmp_path / "s", fleet.root_bytes("catalogue"), fleet.root_bytes("director"), "s1", "eu"
    )
    loaded = SiteIdentity.load(tmp_path / "s")
    assert loaded == identity
    assert loaded.signer().public_key == identity.public_key
    site = json.loads((tmp_path / "s" / "site.json").read_text())
    assert "private" not in json.dumps(site).lower()


def test_a_root_not_signed_by_its_own_keys_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    forged = resign_root(fleet.root_bytes("catalogue"), [generate_key()])
    with pytest.raises(SignatureError):
        enroll(tmp_path / "s", forged, fleet.root_bytes("director"), "s1", "eu")
    assert not (tmp_path / "s").exists()


def test_a_file_that_is_not_a_root_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    timestamp = fleet.stores["catalogue"].files["metadata/timestamp.json"]
    with pytest.raises(MetadataError, match="not root"):
        enroll(tmp_path / "s", timestamp, fleet.root_bytes("director"), "s1", "eu")
    with pytest.raises(MetadataError):
        enroll(tmp_path / "s", b"{", fleet.root_bytes("director"), "s1", "eu")


def test_a_bad_site_name_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="site"):
        enroll(
            tmp_path / "s",
            fleet.root_bytes("catalogue"),
            fleet.root_bytes("director"),
            "../x",
            "eu",
        )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted afterwards; skipped where mounting is refused."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_a_storage_error_and_keeps_the_trust_state(
    fleet: Fleet, tiny_disk: Path
) -> None:
    fleet.release_to(["site-a"])
    state = tiny_disk / "state"
    enroll(state, fleet.root_bytes("catalogue"), fleet.root_bytes("director"), "site-a", "eu")
    fill = tiny_disk / "fill"
    fd = os.open(fill, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    site = SiteSync(
        state,
        catalogue_url=CATALOGUE_URL,
        director_url=DIRECTOR_URL,
        agent_version="0.1.0",
        onnxruntime="1.32.0",
        fetcher=fleet.fetcher,
    )
    with pytest.raises(StorageError, match="No space left"):
        site.update()
    assert site.installed_releases() == {}
    assert not [p for p in (state / "bundles").rglob("*") if p.is_file()]
    fill.unlink()
    got = site.update()
    assert got is not None
    assert got.id == "tiny@1"


def test_a_garbled_installed_record_is_a_storage_error(fleet: Fleet) -> None:
    site = fleet.site()
    (site.state_dir / "installed.json").write_text('{"releases": {"tiny": "three"}}')
    with pytest.raises(StorageError, match="release counters"):
        site.update()
