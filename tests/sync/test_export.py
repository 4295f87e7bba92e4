"""Air-gapped sites: a bundle carried to a site as one export file, verified and installed
there exactly as online, and what a hostile or stale file gets (refused, nothing
installed, the bundle the site runs kept). Real python-tuf metadata, real tar files."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine

from fogline.sync import (
    ArchiveError,
    ArchiveFetcher,
    ExpiredError,
    MetadataVersionError,
    OversizedError,
    Release,
    SignatureError,
    SiteSync,
    TamperedError,
    UnsafeMemberError,
    VerificationError,
    VerifiedBundle,
    WrongSiteError,
    enroll,
    import_bundle,
    read_freshness,
)
from fogline.sync._export import export_manifest, export_members, write_export
from fogline.sync._writer import utc_now

from .conftest import Fleet

pytestmark = pytest.mark.timeout(60)


def export(fleet: Fleet, out: Path, site: str = "site-a", release: Release | None = None) -> Path:
    """Write ``fleet``'s export of ``release`` (default: what the director names) for
    ``site``."""
    release = release or fleet.director.desired(site)
    assert release is not None
    out.parent.mkdir(parents=True, exist_ok=True)
    members, expires = export_members(
        fleet.stores["catalogue"], fleet.stores["director"], site, release
    )
    write_export(out, export_manifest(site, release, members, expires), members)
    return out


def enrolled(fleet: Fleet, name: str, site: str = "site-a", region: str = "eu") -> Path:
    state = fleet.tmp / name
    enroll(state, fleet.root_bytes("catalogue"), fleet.root_bytes("director"), site, region)
    return state


def do_import(state: Path, file: Path) -> VerifiedBundle:
    return import_bundle(state, file, agent_version="0.1.0", onnxruntime="1.32.0")


def members_of(file: Path) -> dict[str, bytes]:
    with tarfile.open(file) as tar:
        out = {}
        for m in tar.getmembers():
            reader = tar.extractfile(m)
            assert reader is not None
            out[m.name] = reader.read()
        return out


def rewrite(file: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """``file`` with its members changed by ``change`` (a dict name → bytes)."""
    members = members_of(file)
    change(members)
    with tarfile.open(file, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return file


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` by relative path: its bytes, or a link's target."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def nothing_installed(state: Path) -> bool:
    bundles = state / "bundles"
    files = [p for p in bundles.rglob("*") if p.is_file()] if bundles.exists() else []
    return not files and not (state / "installed.json").exists()


def model_member(file: Path, filename: str) -> str:
    (name,) = [n for n in members_of(file) if n.endswith(f".{filename}")]
    return name


# ------------------------------------------------------------------------ the good path


def test_import_installs_exactly_as_online(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    online = fleet.site()
    got_online = online.update()
    assert got_online is not None
    online.record_installed(got_online)

    state = enrolled(fleet, "imported")
    got = do_import(state, export(fleet, fleet.tmp / "tiny.tar"))
    assert got == VerifiedBundle(
        release=got_online.release,
        path=state / "bundles" / "tiny" / "1",
        files=got_online.files,
        installed=False,
        local=got_online.local,
        # read from the archive as online from the catalogue: the manifest and the edge model
        bytes_transferred=got_online.bytes_transferred,
        bytes_full=got_online.bytes_full,
    )
    for part in ("trust", "bundles"):
        assert tree(state / part) == tree(online.state_dir / part)
    assert (state / "installed.json").read_bytes() == (
        online.state_dir / "installed.json"
    ).read_bytes()


def test_importing_the_same_export_again_is_already_installed(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    state = enrolled(fleet, "imported")
    file = export(fleet, fleet.tmp / "tiny.tar")
    assert not do_import(state, file).installed
    assert do_import(state, file).installed


def test_an_export_is_deterministic_with_safe_member_names(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    first = export(fleet, fleet.tmp / "a.tar").read_bytes()
    second = export(fleet, fleet.tmp / "b.tar").read_bytes()
    assert first == second
    with tarfile.open(fleet.tmp / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "export.json"
    assert names[1:] == sorted(names[1:])
    assert all(m.isfile() and m.mtime == 0 and not m.name.startswith("/") for m in members)
    manifest = json.loads(members_of(fleet.tmp / "a.tar")["export.json"])
    assert manifest["site"] == "site-a"
    assert manifest["bundle"]["sha256"] == release.sha256
    assert set(manifest["members"]) == set(names[1:])
    # Every root version of both repositories, and the site's bin of the director.
    assert "catalogue/metadata/1.root.json" in names
    assert "director/metadata/1.root.json" in names
    assert any(n.startswith("director/metadata/") and ".sites-" in n for n in names)
    # What a site downloads online, no more: its edge model, not the cloud part.
    assert any(n.endswith(".edge.onnx") for n in names)
    assert not any(n.endswith(".cloud.onnx") for n in names)


# ------------------------------------------------------------------------------ attacks


def test_attack_export_with_tampered_artifact_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    file = export(fleet, fleet.tmp / "tiny.tar")
    name = model_member(file, "edge.onnx")

    def flip(members: dict[str, bytes]) -> None:
        data = bytearray(members[name])
        data[len(data) // 2] ^= 0x01
        members[name] = bytes(data)

    rewrite(file, flip)
    state = enrolled(fleet, "imported")
    with pytest.raises(TamperedError, match=r"edge\.onnx"):
        do_import(state, file)
    assert nothing_installed(state)


def _traversal(info: tarfile.TarInfo) -> None:
    info.name = "catalogue/../../evil.json"


def _absolute(info: tarfile.TarInfo) -> None:
    info.name = "/tmp/fogline-evil.json"


def _symlink(info: tarfile.TarInfo) -> None:
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    info.size = 0


def _hardlink(info: tarfile.TarInfo) -> None:
    info.type = tarfile.LNKTYPE
    info.linkname = "export.json"
    info.size = 0


def _device(info: tarfile.TarInfo) -> None:
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    info.size = 0


@pytest.mark.parametrize(
    "make_unsafe",
    [_traversal, _absolute, _symlink, _hardlink, _device],
    ids=["dot-dot", "absolute", "symlink", "hardlink", "device"],
)
def test_attack_export_with_path_traversal_member_is_refused(
    fleet: Fleet, make_unsafe: Callable[[tarfile.TarInfo], None]
) -> None:
    fleet.release_to(["site-a"])
    file = export(fleet, fleet.tmp / "tiny.tar")
    members = members_of(file)
    with tarfile.open(file, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("catalogue/metadata/99.root.json")
        info.size = 4
        make_unsafe(info)
        tar.addfile(info, io.BytesIO(b"evil") if info.size else None)
    state = enrolled(fleet, "imported")
    with pytest.raises(UnsafeMemberError, match="member"):
        do_import(state, file)
    assert nothing_installed(state)
    assert not (fleet.tmp.parent / "evil.json").exists()
    assert not Path("/tmp/fogline-evil.json").exists()


def test_attack_export_signed_by_another_fleets_root_is_refused(
    fleet: Fleet, make_other_fleet: Callable[[], Fleet]
) -> None:
    fleet.release_to(["site-a"])
    other = make_other_fleet()
    other.release_to(["site-a"])
    state = enrolled(fleet, "imported")  # trusts this fleet's roots only
    with pytest.raises(SignatureError):
        do_import(state, export(other, fleet.tmp / "other.tar"))
    assert nothing_installed(state)


def test_attack_export_for_another_site_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-b"])
    file = export(fleet, fleet.tmp / "site-b.tar", site="site-b")
    state = enrolled(fleet, "imported", site="site-a")
    with pytest.raises(WrongSiteError, match="site-b"):
        do_import(state, file)
    assert nothing_installed(state)

    # export.json is not signed: saying "site-a" there changes nothing that is verified.
    def relabel(members: dict[str, bytes]) -> None:
        manifest = json.loads(members["export.json"])
        manifest["site"] = "site-a"
        members["export.json"] = json.dumps(manifest).encode()

    rewrite(file, relabel)
    with pytest.raises(VerificationError):
        do_import(state, file)
    assert nothing_installed(state)


def test_attack_oversized_member_is_cut_off(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    file = export(fleet, fleet.tmp / "tiny.tar")
    state = enrolled(fleet, "imported")

    # A timestamp far over python-tuf's 16 KiB bound: refused before a byte is read.
    def huge_timestamp(members: dict[str, bytes]) -> None:
        members["director/metadata/timestamp.json"] += b" " * (1024 * 1024)

    rewrite(file, huge_timestamp)
    with ArchiveFetcher(file) as fetcher:
        with pytest.raises(Exception, match="more than the 16384 allowed"):
            fetcher.download_bytes(f"{fetcher.director_url}/metadata/timestamp.json", 16384)
        assert fetcher.bytes_read == 0
    with pytest.raises(OversizedError, match="timestamp"):
        do_import(state, file)
    assert nothing_installed(state)

    # A model file one byte longer than the catalogue signed.
    file = export(fleet, fleet.tmp / "tiny.tar")
    name = model_member(file, "edge.onnx")
    rewrite(file, lambda members: members.__setitem__(name, members[name] + b"\0"))
    with pytest.raises(OversizedError, match=r"edge\.onnx"):
        do_import(state, file)
    assert nothing_installed(state)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a tar file"),
        (b"PK\x03\x04 a zip file, not a tar" * 40, "not a tar file"),
        (None, "no export.json"),
        (b"[" * 100_000, "export.json is not JSON"),
        (b'{"kind": "fogline-export", "format": 2}', "not a fogline export"),
        (
            b'{"kind": "fogline-export", "format": 1, "site": "site-a", "bundle": {}, '
            b'"members": {"x": 1}}',
            "without a length",
        ),
    ],
    ids=["empty", "zip", "no-manifest", "deep-json", "other-format", "bad-members"],
)
def test_a_file_that_is_not_an_export_is_refused(
    fleet: Fleet, content: bytes | None, reason: str
) -> None:
    fleet.release_to(["site-a"])
    state = enrolled(fleet, "imported")
    file = fleet.tmp / "not-an-export.tar"
    if content is None:
        file = rewrite(export(fleet, file), lambda members: members.pop("export.json"))
    elif content.startswith((b"{", b"[")):
        file = rewrite(export(fleet, file), lambda m: m.__setitem__("export.json", content))
    else:
        file.write_bytes(content)
    with pytest.raises(ArchiveError, match=reason):
        do_import(state, file)
    assert nothing_installed(state)


def test_a_member_twice_or_a_truncated_export_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    state = enrolled(fleet, "imported")
    file = export(fleet, fleet.tmp / "tiny.tar")
    with tarfile.open(file, "a") as tar:
        info = tarfile.TarInfo("director/metadata/timestamp.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ArchiveError, match="twice"):
        do_import(state, file)
    file = export(fleet, fleet.tmp / "tiny.tar")
    with tarfile.open(file) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".edge.onnx"))
    file.write_bytes(file.read_bytes()[: member.offset_data + member.size // 2])
    with pytest.raises(ArchiveError, match=r"truncated inside member .*edge\.onnx"):
        do_import(state, file)
    assert nothing_installed(state)


def test_attack_older_export_after_a_newer_one_is_a_rollback(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    state = enrolled(fleet, "imported")
    old = export(fleet, fleet.tmp / "v1.tar")
    fleet.director.assign(["site-a"], fleet.publish(version="2"))
    assert do_import(state, export(fleet, fleet.tmp / "v2.tar")).id == "tiny@2"
    with pytest.raises(MetadataVersionError, match="timestamp"):
        do_import(state, old)
    assert json.loads((state / "installed.json").read_text())["releases"] == {"tiny": 2}


def test_an_export_missing_a_model_file_is_refused_naming_it(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    file = export(fleet, fleet.tmp / "tiny.tar")
    name = model_member(file, "edge.onnx")
    rewrite(file, lambda members: members.pop(name))
    state = enrolled(fleet, "imported")
    with pytest.raises(ArchiveError, match=r"lacks .*edge\.onnx"):
        do_import(state, file)
    assert nothing_installed(state)


# -------------------------------------------------------------------------------- expiry


def installed_files(state: Path) -> Mapping[str, bytes | str]:
    return {**tree(state / "bundles"), "installed.json": (state / "installed.json").read_bytes()}


def test_expired_export_installs_nothing_and_keeps_serving_bundle(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    state = enrolled(fleet, "imported")
    do_import(state, export(fleet, fleet.tmp / "v1.tar"))
    before = installed_files(state)
    second = fleet.publish(version="2")
    fleet.director.assign(["site-a"], second)
    file = export(fleet, fleet.tmp / "v2.tar")
    # The file reaches the site after the timestamps inside expired (one day).
    with time_machine.travel(utc_now() + timedelta(days=3), tick=False):
        with pytest.raises(ExpiredError, match="timestamp"):
            do_import(state, file)
        assert installed_files(state) == before
        assert not (state / "bundles" / "tiny" / "2").exists()
        assert list((state / "bundles" / "tiny").iterdir()) == [state / "bundles" / "tiny" / "1"]


def test_stale_site_refreshes_once_fresh_metadata_is_reachable(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    site = fleet.site()
    got = site.update()
    assert got is not None
    site.record_installed(got)
    assert not site.freshness().stale
    before = installed_files(site.state_dir)

    with time_machine.travel(utc_now() + timedelta(days=3), tick=False):
        # Offline for three days: nothing was re-signed, the cached timestamps expired.
        fresh = site.freshness()
        assert fresh.stale
        for repository in ("catalogue", "director"):
            roles = fresh.repositories[repository].roles
            assert roles["timestamp"].expired
            assert not roles["root"].expired
        with pytest.raises(ExpiredError):
            site.update()
        assert installed_files(site.state_dir) == before

        # The publisher is reachable again and re-signs; a new release is waiting.
        for writer in fleet.writers.values():
            writer.refresh()
        second = fleet.publish(version="2")
        fleet.director.assign(["site-a"], second)
        got = site.update()
        assert got is not None
        assert got.release == second
        assert not site.freshness().stale


def test_a_newer_export_of_the_same_bundle_renews_a_stale_site(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    state = enrolled(fleet, "imported")
    do_import(state, export(fleet, fleet.tmp / "first.tar"))
    with time_machine.travel(utc_now() + timedelta(days=3), tick=False):
        assert read_freshness(state).stale
        for writer in fleet.writers.values():
            writer.refresh()
        got = do_import(state, export(fleet, fleet.tmp / "renewed.tar"))
        assert got.installed
        assert not read_freshness(state).stale


def test_a_site_that_never_refreshed_is_stale(fleet: Fleet) -> None:
    site: SiteSync = fleet.site()
    fresh = site.freshness()
    assert fresh.stale
    assert fresh.repositories["director"].missing == ("root", "timestamp", "snapshot", "targets")
