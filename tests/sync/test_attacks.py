"""Attacks on the signed model sync, each against real python-tuf metadata served from
memory: what a thief of one key, a hostile mirror or a man in the middle can try, and
what the site does about it (it refuses, names why, and installs nothing)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from fogline.sync import (
    AgentVersionError,
    DisagreementError,
    ExpiredError,
    MetadataVersionError,
    NotReleasedError,
    OversizedError,
    Platform,
    PlatformError,
    RegionError,
    Release,
    ReleaseRollbackError,
    RepositoryWriter,
    SignatureError,
    SiteSync,
    TamperedError,
    UnsafePathError,
    VerificationError,
    WrongSiteError,
    generate_key,
)
from fogline.sync._writer import utc_now

from .conftest import Fleet, endless


def resign(data: bytes, signers: Sequence[CryptoSigner], edit: Callable[[Any], None]) -> bytes:
    """``data`` (metadata) changed by ``edit`` and signed by ``signers`` only."""
    md = Metadata[Any].from_bytes(data)
    edit(md.signed)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer(compact=True))


def nothing_installed(site: SiteSync) -> bool:
    """No bundle file on disk (finished or half-downloaded) and nothing recorded."""
    files = [p for p in (site.state_dir / "bundles").rglob("*") if p.is_file()]
    return not files and site.installed_releases() == {}


def stored_artifact(fleet: Fleet, release: Release, filename: str) -> str:
    info = fleet.catalogue.manifest(release)["files"][filename]
    return f"targets/{release.name}/{release.version}/{info['sha256']}.{filename}"


# ------------------------------------------------------------------------ the good path


def test_a_site_installs_the_bundle_both_repositories_agree_on(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    site = fleet.site()
    got = site.update()
    assert got is not None
    assert got.release == release
    assert not got.installed
    # A site holds what it runs: the manifest and the edge part; the cloud part's hashes
    # are known from the signed manifest.
    assert sorted(p.name for p in got.path.iterdir()) == ["edge.onnx", "manifest.json"]
    assert set(got.files) == {"cloud.onnx", "edge.onnx"}
    site.record_installed(got)
    again = site.update()
    assert again is not None
    assert again.installed


def test_a_site_the_director_names_nothing_for_installs_nothing(fleet: Fleet) -> None:
    fleet.publish()
    site = fleet.site()
    assert site.update() is None
    assert nothing_installed(site)


# ------------------------------------------------------------------------ tampered data


def test_attack_tampered_artifact_is_refused(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    path = stored_artifact(fleet, release, "edge.onnx")
    data = bytearray(fleet.stores["catalogue"].files[path])
    data[len(data) // 2] ^= 0x01
    fleet.stores["catalogue"].files[path] = bytes(data)
    site = fleet.site()
    with pytest.raises(TamperedError, match=r"edge\.onnx"):
        site.update()
    assert nothing_installed(site)


def test_attack_tampered_manifest_is_refused(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    path = f"targets/tiny/1/{release.sha256}.manifest.json"
    manifest = json.loads(fleet.stores["catalogue"].files[path])
    manifest["thresholds"]["relevance"] = 0.0
    fleet.stores["catalogue"].files[path] = json.dumps(manifest).encode()
    site = fleet.site()
    with pytest.raises(TamperedError):
        site.update()
    assert nothing_installed(site)


# --------------------------------------------------------------------------- signatures


def test_attack_unsigned_timestamp_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    store = fleet.stores["director"].files
    store["metadata/timestamp.json"] = resign(store["metadata/timestamp.json"], [], lambda s: None)
    with pytest.raises(SignatureError, match="timestamp"):
        fleet.site().update()


def test_attack_targets_signed_by_the_wrong_key_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    store = fleet.stores["catalogue"].files
    version = fleet.writers["catalogue"].targets().version
    path = f"metadata/{version}.targets.json"
    store[path] = resign(store[path], [generate_key()], lambda s: None)
    with pytest.raises(VerificationError):
        fleet.site().update()


def test_attack_new_root_under_threshold_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    store = fleet.stores["catalogue"].files
    one_root_key = fleet.root_signers["catalogue"][:1]  # the threshold is 2 of 3

    def bump(root: Root) -> None:
        root.version = 2

    store["metadata/2.root.json"] = resign(store["metadata/1.root.json"], one_root_key, bump)
    with pytest.raises(SignatureError, match="root"):
        fleet.site().update()


def test_attack_bundle_signed_under_another_fleets_root_is_refused(
    fleet: Fleet, make_other_fleet: Callable[[], Fleet]
) -> None:
    other = make_other_fleet()
    other.release_to(["site-a"])
    site = fleet.site()  # enrolled with this fleet's roots…
    site._fetcher = other.fetcher  # …but served the other fleet's repositories
    with pytest.raises(SignatureError):
        site.update()
    assert nothing_installed(site)


# ----------------------------------------------------------------- versions and expiry


def test_attack_metadata_rollback_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    store = fleet.stores["catalogue"].files
    old_timestamp = store["metadata/timestamp.json"]
    site = fleet.site()
    fleet.publish(version="2")
    assert site.update() is not None  # the site has seen the newer timestamp
    store["metadata/timestamp.json"] = old_timestamp
    with pytest.raises(MetadataVersionError, match="timestamp"):
        site.update()


def test_attack_director_snapshot_rollback_is_refused(fleet: Fleet) -> None:
    first = fleet.release_to(["site-a"], version="1")
    store = fleet.stores["director"].files
    old = store["metadata/timestamp.json"]
    second = fleet.publish(version="2")
    fleet.director.assign(["site-a"], second)
    site = fleet.site()
    got = site.update()
    assert got is not None
    assert got.release == second
    store["metadata/timestamp.json"] = old  # a mirror pins the site to the first bundle
    with pytest.raises(MetadataVersionError):
        site.update()
    assert first.release < second.release


def test_attack_expired_metadata_freeze_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    # A mirror frozen at a timestamp signed two days ago, valid for one.
    frozen = RepositoryWriter(
        fleet.stores["catalogue"],
        {"timestamp": [fleet.role_signers["catalogue"]["timestamp"]]},
        name="catalogue",
        now=lambda: utc_now() - timedelta(days=2),
    )
    frozen.do_timestamp(force=True)
    site = fleet.site()
    with pytest.raises(ExpiredError, match="timestamp"):
        site.update()
    assert nothing_installed(site)


def test_attack_mix_and_match_snapshot_and_targets_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    fleet.publish(version="2")
    store = fleet.stores["catalogue"].files
    version = fleet.writers["catalogue"].targets().version
    # The newest snapshot names targets v<version>; serve the one before under that name.
    store[f"metadata/{version}.targets.json"] = store[f"metadata/{version - 1}.targets.json"]
    with pytest.raises((TamperedError, MetadataVersionError)):
        fleet.site().update()


def test_attack_mix_and_match_without_snapshot_hashes_is_a_version_mismatch(
    fleet: Fleet,
) -> None:
    fleet.release_to(["site-a"], version="1")
    fleet.publish(version="2")
    store = fleet.stores["catalogue"].files
    writer = fleet.writers["catalogue"]
    targets_version = writer.targets().version
    snapshot_version = writer.snapshot().version

    def drop_hashes(snapshot: Any) -> None:
        snapshot.meta["targets.json"].hashes = None
        snapshot.meta["targets.json"].length = None

    # A snapshot listing only versions (as TUF allows) still pins targets' version.
    path = f"metadata/{snapshot_version}.snapshot.json"
    store[path] = resign(store[path], [fleet.role_signers["catalogue"]["snapshot"]], drop_hashes)

    def drop_snapshot_hashes(timestamp: Any) -> None:
        timestamp.snapshot_meta.hashes = None
        timestamp.snapshot_meta.length = None

    store["metadata/timestamp.json"] = resign(
        store["metadata/timestamp.json"],
        [fleet.role_signers["catalogue"]["timestamp"]],
        drop_snapshot_hashes,
    )
    store[f"metadata/{targets_version}.targets.json"] = store[
        f"metadata/{targets_version - 1}.targets.json"
    ]
    with pytest.raises(MetadataVersionError, match="targets"):
        fleet.site().update()


# -------------------------------------------------------------------------- endless data


def test_attack_endless_metadata_is_cut(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    body, taken = endless()
    fleet.fetcher.files[fleet.url("director", "metadata/timestamp.json")] = body
    with pytest.raises(OversizedError):
        fleet.site().update()
    assert taken[0] <= 2  # python-tuf's 16 KiB bound on timestamp.json


def test_attack_endless_artifact_is_cut(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    body, taken = endless()
    url = fleet.url("catalogue", stored_artifact(fleet, release, "edge.onnx"))
    fleet.fetcher.files[url] = body
    site = fleet.site()
    with pytest.raises(OversizedError):
        site.update()
    assert taken[0] <= 2  # cut at the signed length, a few KiB
    assert nothing_installed(site)


def test_attack_oversized_snapshot_is_cut_at_its_signed_length(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    version = fleet.writers["catalogue"].snapshot().version
    url = fleet.url("catalogue", f"metadata/{version}.snapshot.json")
    fleet.fetcher.files[url] = fleet.stores["catalogue"].files[
        f"metadata/{version}.snapshot.json"
    ] + (b" " * 10)
    with pytest.raises(OversizedError):
        fleet.site().update()


# ---------------------------------------------------------- director against catalogue


def test_attack_director_names_a_bundle_the_catalogue_never_released(fleet: Fleet) -> None:
    real = fleet.publish()
    forged = dataclasses.replace(real, version="9", sha256="ab" * 32, length=1234)
    fleet.director.assign(["site-a"], forged)  # with the stolen online key
    site = fleet.site()
    with pytest.raises(NotReleasedError, match=r"tiny/9/manifest\.json"):
        site.update()
    assert nothing_installed(site)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("hashes", {"sha256": "cd" * 32}),
        ("length", {"length": 7}),
        ("platform", {"platform": Platform("1.20", "CUDAExecutionProvider")}),
        ("release", {"release": 5}),
        ("regions", {"regions": ("eu", "us")}),
        ("min_agent_version", {"min_agent_version": "0.0.1"}),
    ],
)
def test_attack_director_and_catalogue_disagree(
    fleet: Fleet, field: str, change: dict[str, Any]
) -> None:
    real = fleet.publish()
    fleet.director.assign(["site-a"], dataclasses.replace(real, **change))
    site = fleet.site()
    with pytest.raises(DisagreementError) as exc:
        site.update()
    assert exc.value.field == field
    assert nothing_installed(site)


def test_attack_release_key_alone_cannot_target_a_site(fleet: Fleet) -> None:
    good = fleet.release_to(["site-a"], version="1")
    # A thief of the release key publishes; without the director nobody is told to run it.
    fleet.publish(version="2", release=99)
    got = fleet.site().update()
    assert got is not None
    assert got.release == good


def test_attack_bundle_for_another_site_is_not_installed(fleet: Fleet) -> None:
    fleet.release_to(["site-b"])
    site = fleet.site("site-a")
    assert site.update() is None
    assert nothing_installed(site)


def test_attack_director_entry_naming_another_site_is_refused(fleet: Fleet) -> None:
    release = fleet.release_to(["site-b"])
    writer = fleet.writers["director"]
    bins = writer.bins()
    assert bins is not None
    entry_b = writer.targets(bins.get_role_for_target("sites/site-b")).targets["sites/site-b"]
    with writer.edit_targets(bins.get_role_for_target("sites/site-a")) as targets:
        targets.targets["sites/site-a"] = TargetFile(
            entry_b.length, dict(entry_b.hashes), "sites/site-a", dict(entry_b.unrecognized_fields)
        )
    writer.commit()
    site = fleet.site("site-a")
    with pytest.raises(WrongSiteError, match="site-b"):
        site.update()
    assert release.name == "tiny"


# ---------------------------------------------------------------------- site's checks


def test_attack_lower_release_counter_is_refused(fleet: Fleet) -> None:
    first = fleet.publish(version="1")
    second = fleet.release_to(["site-a"], version="2")
    site = fleet.site()
    got = site.update()
    assert got is not None
    site.record_installed(got)
    fleet.director.assign(["site-a"], first)  # a stolen director key rolls the site back
    with pytest.raises(ReleaseRollbackError, match="lower than the installed 2"):
        site.update()
    assert site.installed_releases() == {"tiny": second.release}


def test_attack_bundle_not_allowed_in_the_sites_region_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], regions=("us-east",))
    site = fleet.site("site-a", region="eu")
    with pytest.raises(RegionError, match="us-east"):
        site.update()
    assert nothing_installed(site)


def test_a_bundle_for_every_region_runs_anywhere(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], regions=("*",))
    assert fleet.site("site-a", region="ap-south").update() is not None


@pytest.mark.parametrize(
    ("platform", "site_kwargs", "error"),
    [
        (Platform("9.0"), {}, PlatformError),
        (Platform("1.20", "CUDAExecutionProvider"), {}, PlatformError),
        (Platform("1.20"), {"agent_version": "0.0.9"}, AgentVersionError),
    ],
)
def test_a_bundle_the_site_cannot_run_is_refused(
    fleet: Fleet, platform: Platform, site_kwargs: dict[str, Any], error: type[Exception]
) -> None:
    fleet.release_to(["site-a"], platform=platform, min_agent_version="0.1")
    site = fleet.site(**site_kwargs)
    with pytest.raises(error):
        site.update()
    assert nothing_installed(site)


# -------------------------------------------------------------------------- path names


def test_attack_path_traversal_in_the_directors_target_is_refused(fleet: Fleet) -> None:
    release = fleet.release_to(["site-a"])
    writer = fleet.writers["director"]
    bins = writer.bins()
    assert bins is not None
    with writer.edit_targets(bins.get_role_for_target("sites/site-a")) as targets:
        entry = targets.targets["sites/site-a"]
        entry.unrecognized_fields["custom"]["fogline"]["target"] = "../../../etc/passwd"
    writer.commit()
    with pytest.raises(UnsafePathError, match=r"\.\."):
        fleet.site().update()
    assert release.name == "tiny"


def forge_release(fleet: Fleet, manifest: dict[str, Any], version: str, counter: int) -> Release:
    """What a thief of the release key can do: list any manifest in the catalogue."""
    manifest = {**manifest, "version": version}
    manifest["release"] = {**manifest["release"], "counter": counter}
    data = json.dumps(manifest).encode()
    sha256 = TargetFile.from_data("manifest.json", data).hashes["sha256"]
    release = Release.from_fields(
        {
            "name": manifest["name"],
            "version": version,
            "release": counter,
            "platform": manifest["release"]["platform"],
            "regions": manifest["release"]["regions"],
            "min_agent_version": manifest["release"]["min_agent_version"],
        },
        length=len(data),
        sha256=sha256,
    )
    fleet.stores["catalogue"].files[f"targets/tiny/{version}/{sha256}.manifest.json"] = data
    with fleet.writers["catalogue"].edit_targets() as targets:
        targets.targets[release.path] = TargetFile(
            release.length,
            {"sha256": sha256},
            release.path,
            {"custom": {"fogline": {"kind": "bundle", **release.fields()}}},
        )
    fleet.writers["catalogue"].commit()
    return release


def test_attack_path_traversal_in_a_released_manifest_is_refused(fleet: Fleet) -> None:
    manifest = fleet.catalogue.manifest(fleet.publish())
    manifest["files"]["../../site.key"] = manifest["files"].pop("edge.onnx")
    forged = forge_release(fleet, manifest, version="2", counter=2)
    fleet.director.assign(["site-a"], forged)
    site = fleet.site()
    key_before = (site.state_dir / "site.key").read_bytes()
    with pytest.raises(UnsafePathError, match=r"site\.key"):
        site.update()
    assert (site.state_dir / "site.key").read_bytes() == key_before
    assert nothing_installed(site)


def test_attack_manifest_stating_another_release_is_refused(fleet: Fleet) -> None:
    manifest = fleet.catalogue.manifest(fleet.publish())
    manifest["release"]["regions"] = ["*"]
    forged = forge_release(fleet, manifest, version="2", counter=2)
    # The catalogue entry says eu only; the manifest the agent would load says anywhere.
    with fleet.writers["catalogue"].edit_targets() as targets:
        custom = targets.targets[forged.path].unrecognized_fields["custom"]["fogline"]
        custom["regions"] = ["eu"]
    fleet.writers["catalogue"].commit()
    fleet.director.assign(["site-a"], dataclasses.replace(forged, regions=("eu",)))
    site = fleet.site()
    with pytest.raises(DisagreementError) as exc:
        site.update()
    assert exc.value.field == "manifest"
    assert nothing_installed(site)


# ------------------------------------------------------------------------ root rotation


def test_root_rotation_is_followed_one_version_at_a_time(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    site = fleet.site()
    assert site.update() is not None
    writer = fleet.writers["catalogue"]
    writer.set_signers("root", fleet.root_signers["catalogue"])
    for _ in range(2):
        new_keys = [generate_key() for _ in range(3)]
        writer.rotate("root", new_keys, threshold=2)
        writer.set_signers("root", new_keys)
    assert writer.root().version == 3
    second = fleet.publish(version="2")
    fleet.director.assign(["site-a"], second)
    got = site.update()
    assert got is not None
    assert got.release == second
    history = site.state_dir / "trust" / "catalogue" / "root_history"
    assert sorted(p.name for p in history.iterdir()) == [
        "1.root.json",
        "2.root.json",
        "3.root.json",
    ]


def test_a_site_enrolled_before_rotations_walks_every_root(fleet: Fleet) -> None:
    writer = fleet.writers["director"]
    writer.set_signers("root", fleet.root_signers["director"])
    keys = fleet.root_signers["director"]
    for _ in range(3):
        keys = [generate_key() for _ in range(3)]
        writer.rotate("root", keys, threshold=2)
        writer.set_signers("root", keys)
    fleet.release_to(["site-a"])
    assert fleet.site().update() is not None


def test_attack_intermediate_root_incorrectly_signed_is_refused(fleet: Fleet) -> None:
    fleet.release_to(["site-a"])
    store = fleet.stores["catalogue"].files
    new_keys = [generate_key() for _ in range(3)]

    def rotate(root: Root) -> None:
        root.version = 2
        for keyid in list(root.roles["root"].keyids):
            root.revoke_key(keyid, "root")
        for signer in new_keys:
            root.add_key(signer.public_key, "root")

    # Signed by the new keys only: the old threshold never agreed to the rotation.
    store["metadata/2.root.json"] = resign(store["metadata/1.root.json"], new_keys, rotate)

    def next_root(root: Root) -> None:
        root.version = 3

    store["metadata/3.root.json"] = resign(store["metadata/2.root.json"], new_keys, next_root)
    site = fleet.site()
    with pytest.raises(SignatureError, match="root"):
        site.update()
    assert nothing_installed(site)


def test_attack_rotated_out_release_key_can_no_longer_sign(fleet: Fleet) -> None:
    fleet.release_to(["site-a", "site-b"], version="1")
    writer = fleet.writers["catalogue"]
    writer.set_signers("root", fleet.root_signers["catalogue"])
    old_release_key = fleet.role_signers["catalogue"]["targets"]
    writer.rotate("targets", [generate_key()])
    site = fleet.site()
    assert site.update() is not None
    # The thief of the old release key signs a targets version of its own.
    store = fleet.stores["catalogue"].files
    version = writer.targets().version
    path = f"metadata/{version}.targets.json"

    def add_evil(targets: Targets) -> None:
        targets.targets["tiny/666/manifest.json"] = TargetFile(1, {"sha256": "ee" * 32}, "x")

    forged = resign(store[path], [old_release_key], add_evil)
    store[path] = forged
    # …and, holding the online snapshot and timestamp keys too, pins the forgery.
    online = fleet.role_signers["catalogue"]
    snapshot_path = f"metadata/{writer.snapshot().version}.snapshot.json"

    def pin_targets(snapshot: Any) -> None:
        snapshot.meta["targets.json"] = MetaFile(version, len(forged), None)

    store[snapshot_path] = resign(store[snapshot_path], [online["snapshot"]], pin_targets)

    def pin_snapshot(timestamp: Any) -> None:
        timestamp.snapshot_meta = MetaFile(timestamp.snapshot_meta.version)

    store["metadata/timestamp.json"] = resign(
        store["metadata/timestamp.json"], [online["timestamp"]], pin_snapshot
    )
    with pytest.raises(SignatureError, match="targets"):
        fleet.site("site-b").update()
