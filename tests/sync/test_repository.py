"""Writing the repositories: only verifiable metadata is written, the director's sites
live in hash bins (one site's change re-signs one bin), releases are content-addressed,
refresh re-signs what is due."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from fogline.sync import (
    Director,
    Expiry,
    MemoryStore,
    Platform,
    PublishError,
    RepositoryWriter,
    SigningKeyError,
    generate_key,
)
from fogline.sync._writer import utc_now

from .conftest import Fleet


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def write(self, path: str, data: bytes) -> None:
        self.written.append(path)
        super().write(path, data)


def director_writer(store: MemoryStore, bits: int = 8) -> RepositoryWriter:
    writer = RepositoryWriter(store, name="director")
    writer.initialise(
        root_signers=[generate_key()],
        root_threshold=1,
        role_signers={r: generate_key() for r in ("targets", "snapshot", "timestamp")},
        bins_bit_length=bits,
    )
    return writer


def test_one_sites_change_re_signs_one_bin(fleet: Fleet) -> None:
    release = fleet.publish()
    store = CountingStore()
    director = Director(director_writer(store))
    store.written.clear()
    director.assign(["plant-7"], release)
    bins = [p for p in store.written if ".sites-" in p]
    assert len(bins) == 1
    assert [p for p in store.written if p not in bins] == [
        f"metadata/{director.writer.snapshot().version}.snapshot.json",
        "metadata/timestamp.json",
    ]
    assert director.desired("plant-7") == release
    assert director.desired("plant-8") is None


def test_ten_thousand_sites_fit_in_small_files(fleet: Fleet) -> None:
    release = fleet.publish()
    store = MemoryStore()
    director = Director(director_writer(store, bits=8))
    sites = [f"site-{i:05d}" for i in range(10_000)]
    director.assign(sites, release)
    writer = director.writer
    snapshot = store.files[f"metadata/{writer.snapshot().version}.snapshot.json"]
    targets = store.files[f"metadata/{writer.targets().version}.targets.json"]
    bins = writer.bins()
    assert bins is not None
    one_bin = writer.targets(bins.get_role_for_target("sites/site-00042"))
    bin_bytes = store.files[
        f"metadata/{one_bin.version}.{bins.get_role_for_target('sites/site-00042')}.json"
    ]
    # What one site downloads per refresh: timestamp, snapshot, targets and its own bin.
    assert len(snapshot) < 64 * 1024
    assert len(targets) < 4 * 1024
    assert len(bin_bytes) < 64 * 1024
    assert 10 < len(one_bin.targets) < 100


def test_a_role_short_of_its_threshold_is_not_written(tmp_path: Path) -> None:
    store = MemoryStore()
    root_keys = [generate_key() for _ in range(3)]
    writer = RepositoryWriter(store, name="catalogue")
    writer.initialise(
        root_signers=root_keys,
        root_threshold=2,
        role_signers={r: generate_key() for r in ("targets", "snapshot", "timestamp")},
    )
    before = dict(store.files)
    writer.set_signers("root", root_keys[:1])
    with pytest.raises(SigningKeyError, match="root v2 needs the threshold"):
        writer.rotate("timestamp", [generate_key()])
    assert store.files == before
    assert writer.root().version == 1


def test_a_root_rotation_without_the_old_threshold_is_not_written() -> None:
    store = MemoryStore()
    old = [generate_key() for _ in range(3)]
    writer = RepositoryWriter(store, name="catalogue")
    writer.initialise(
        root_signers=old,
        root_threshold=2,
        role_signers={r: generate_key() for r in ("targets", "snapshot", "timestamp")},
    )
    writer.set_signers("root", old[:1])
    with pytest.raises(SigningKeyError):
        writer.rotate("root", [generate_key() for _ in range(3)], threshold=2)
    assert "metadata/2.root.json" not in store.files


def test_a_repository_is_initialised_once() -> None:
    store = MemoryStore()
    writer = director_writer(store, bits=1)
    with pytest.raises(PublishError, match="already initialised"):
        writer.initialise(
            root_signers=[generate_key()],
            root_threshold=1,
            role_signers={r: generate_key() for r in ("targets", "snapshot", "timestamp")},
        )


def test_artifacts_are_stored_under_their_sha256(fleet: Fleet) -> None:
    release = fleet.publish()
    manifest = fleet.catalogue.manifest(release)
    for name, info in manifest["files"].items():
        data = fleet.stores["catalogue"].files[f"targets/tiny/1/{info['sha256']}.{name}"]
        assert len(data) == info["bytes"]
    stored = fleet.stores["catalogue"].files[f"targets/tiny/1/{release.sha256}.manifest.json"]
    assert json.loads(stored)["release"]["counter"] == 1


def test_the_release_counter_only_grows(fleet: Fleet) -> None:
    fleet.publish(version="1", release=3)
    with pytest.raises(PublishError, match="must be greater than 3"):
        fleet.publish(version="2", release=3)
    assert fleet.publish(version="2").release == 4
    assert fleet.publish(name="other", version="1").release == 1


def test_a_bad_release_is_refused_before_anything_is_written(fleet: Fleet) -> None:
    before = dict(fleet.stores["catalogue"].files)
    for kwargs in ({"regions": ()}, {"regions": ("../eu",)}, {"min_agent_version": "soon"}):
        with pytest.raises((PublishError, ValueError, TypeError)):
            fleet.publish(**kwargs)
    with pytest.raises(PublishError):
        fleet.publish(name="../x")
    with pytest.raises(ValueError, match="onnxruntime"):
        Platform("latest")
    assert fleet.stores["catalogue"].files == before


def test_refresh_re_signs_the_timestamp_when_half_its_life_is_gone(fleet: Fleet) -> None:
    store = fleet.stores["catalogue"]
    signers = {r: [s] for r, s in fleet.role_signers["catalogue"].items()}
    later = RepositoryWriter(
        store, signers, name="catalogue", now=lambda: utc_now() + timedelta(hours=13)
    )
    version = later.timestamp().version
    report = later.refresh()
    assert report.resigned == ("timestamp",)
    assert report.due_without_key == ()
    assert later.timestamp().version == version + 1
    assert RepositoryWriter(store, signers, name="catalogue").refresh().resigned == ()


def test_expiry_periods_are_checked() -> None:
    for bad in ({"timestamp_days": 0}, {"root_days": -1}, {"snapshot_days": 1e9}):
        with pytest.raises(ValueError, match="expiry"):
            Expiry(**bad)
    with pytest.raises(ValueError, match="unknown"):
        Expiry.from_dict({"lunch_days": 1})
