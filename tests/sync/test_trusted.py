"""A repository read where it is stored (what the cloud loads bundles from): verified from
its trusted root with python-tuf's metadata API, refused when anything does not hold."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import pytest
from tuf.api.metadata import MetaFile

from fogline.sync import (
    ExpiredError,
    MetadataVersionError,
    RepositoryWriter,
    SignatureError,
    TamperedError,
    cloud_files,
    generate_key,
    manifest_files,
    trusted_targets,
)
from fogline.sync._writer import utc_now

from .conftest import Fleet
from .test_attacks import resign, stored_artifact


def test_a_catalogue_lists_its_releases_and_reads_the_cloud_part_checked(fleet: Fleet) -> None:
    release = fleet.publish(version="2")
    trusted = trusted_targets(fleet.stores["catalogue"], name="catalogue")
    assert trusted.release("tiny", "2") == release
    assert trusted.release("tiny", "3") is None
    manifest = trusted.read(trusted.targets[release.path])
    files = manifest_files(manifest, release)
    assert cloud_files(manifest, release, files) == {"cloud.onnx"}
    entry = trusted.get("tiny/2/cloud.onnx")
    assert entry is not None
    assert len(trusted.read(entry)) == files["cloud.onnx"].length


def test_a_director_lists_every_sites_desired_release_across_its_bins(fleet: Fleet) -> None:
    one = fleet.publish(version="1")
    two = fleet.publish(version="2")
    sites = [f"site-{i}" for i in range(40)]  # spread over the 16 bins
    fleet.director.assign(sites[:25], one)
    fleet.director.assign(sites[25:], two)
    desired = trusted_targets(fleet.stores["director"], name="director").desired()
    assert desired == {**dict.fromkeys(sites[:25], one), **dict.fromkeys(sites[25:], two)}


def test_attack_tampered_stored_file_is_refused_naming_it(fleet: Fleet) -> None:
    release = fleet.publish()
    path = stored_artifact(fleet, release, "cloud.onnx")
    data = bytearray(fleet.stores["catalogue"].files[path])
    data[len(data) // 2] ^= 0x01
    fleet.stores["catalogue"].files[path] = bytes(data)
    trusted = trusted_targets(fleet.stores["catalogue"], name="catalogue")
    entry = trusted.get("tiny/1/cloud.onnx")
    assert entry is not None
    with pytest.raises(TamperedError, match=path):
        trusted.read(entry)


def test_attack_targets_signed_by_the_wrong_key_is_refused(fleet: Fleet) -> None:
    fleet.publish()
    store = fleet.stores["catalogue"].files
    path = f"metadata/{fleet.writers['catalogue'].targets().version}.targets.json"
    store[path] = resign(store[path], [generate_key()], lambda s: None)
    with pytest.raises((SignatureError, TamperedError)):
        trusted_targets(fleet.stores["catalogue"], name="catalogue")


def test_attack_a_site_bin_signed_by_the_wrong_key_is_refused(fleet: Fleet) -> None:
    # A thief of the director's snapshot and timestamp keys, not of the bin's key, serves
    # a bin of its own: snapshot and timestamp pin it correctly, its signature does not hold.
    fleet.release_to(["site-a"])
    writer = fleet.writers["director"]
    bins = writer.bins()
    assert bins is not None
    role = bins.get_role_for_target("sites/site-a")
    store = fleet.stores["director"].files
    keys = fleet.role_signers["director"]
    bin_path = f"metadata/{writer.targets(role).version}.{role}.json"
    store[bin_path] = resign(store[bin_path], [generate_key()], lambda s: None)
    forged = store[bin_path]

    def pin_bin(snapshot: Any) -> None:
        snapshot.meta[f"{role}.json"] = MetaFile(
            snapshot.meta[f"{role}.json"].version,
            len(forged),
            {"sha256": hashlib.sha256(forged).hexdigest()},
        )

    snapshot_path = f"metadata/{writer.snapshot().version}.snapshot.json"
    store[snapshot_path] = resign(store[snapshot_path], [keys["snapshot"]], pin_bin)
    snapshot_bytes = store[snapshot_path]

    def pin_snapshot(timestamp: Any) -> None:
        timestamp.snapshot_meta = MetaFile(
            timestamp.snapshot_meta.version,
            len(snapshot_bytes),
            {"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
        )

    store["metadata/timestamp.json"] = resign(
        store["metadata/timestamp.json"], [keys["timestamp"]], pin_snapshot
    )
    with pytest.raises(SignatureError, match=role):
        trusted_targets(fleet.stores["director"], name="director")


def test_attack_a_root_from_another_fleet_is_not_a_trust_anchor(
    fleet: Fleet, make_other_fleet: object
) -> None:
    fleet.publish()
    other = make_other_fleet()  # type: ignore[operator]
    with pytest.raises(SignatureError, match="timestamp"):
        trusted_targets(
            fleet.stores["catalogue"], name="catalogue", trusted_root=other.root_bytes("catalogue")
        )


def test_attack_expired_metadata_freeze_is_refused(fleet: Fleet) -> None:
    fleet.publish()
    frozen = RepositoryWriter(
        fleet.stores["catalogue"],
        {"timestamp": [fleet.role_signers["catalogue"]["timestamp"]]},
        name="catalogue",
        now=lambda: utc_now() - timedelta(days=2),
    )
    frozen.do_timestamp(force=True)
    with pytest.raises(ExpiredError, match="timestamp"):
        trusted_targets(fleet.stores["catalogue"], name="catalogue")


def test_attack_mix_and_match_snapshot_and_targets_is_refused(fleet: Fleet) -> None:
    fleet.publish(version="1")
    fleet.publish(version="2")
    store = fleet.stores["catalogue"].files
    version = fleet.writers["catalogue"].targets().version
    store[f"metadata/{version}.targets.json"] = store[f"metadata/{version - 1}.targets.json"]
    with pytest.raises((TamperedError, MetadataVersionError)):
        trusted_targets(fleet.stores["catalogue"], name="catalogue")
