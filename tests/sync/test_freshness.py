"""Freshness of a site's trusted metadata, as a pure function of the cached files and a
time passed in."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from tuf.api.metadata import Metadata

from fogline.sync import MetadataError
from fogline.sync._freshness import freshness_of

from .conftest import Fleet


def cached(fleet: Fleet) -> dict[str, dict[str, bytes]]:
    """What python-tuf would cache after a refresh: each top-level role, newest version."""
    out: dict[str, dict[str, bytes]] = {}
    for repository, writer in fleet.writers.items():
        files = fleet.stores[repository].files
        snapshot = writer.snapshot().version
        targets = writer.snapshot().meta["targets.json"].version
        out[repository] = {
            "root": files["metadata/root.json"],
            "timestamp": files["metadata/timestamp.json"],
            "snapshot": files[f"metadata/{snapshot}.snapshot.json"],
            "targets": files[f"metadata/{targets}.targets.json"],
        }
    return out


def expires(data: bytes) -> datetime:
    return Metadata.from_bytes(data).signed.expires


def test_the_site_goes_stale_the_moment_its_first_role_expires(fleet: Fleet) -> None:
    files = cached(fleet)
    first = min(expires(d) for roles in files.values() for d in roles.values())
    before = freshness_of(files, first - timedelta(seconds=1))
    assert not before.stale
    assert before.expires == first
    after = freshness_of(files, first)
    assert after.stale
    expired = {
        (repo, role)
        for repo, r in after.repositories.items()
        for role, info in r.roles.items()
        if info.expired
    }
    assert ("catalogue", "timestamp") in expired
    assert ("catalogue", "root") not in expired
    assert after.to_dict()["repositories"]["catalogue"]["roles"]["timestamp"]["expired"]


def test_a_role_never_fetched_is_missing_and_stale(fleet: Fleet) -> None:
    files = cached(fleet)
    del files["director"]["snapshot"]
    now = expires(files["director"]["timestamp"]) - timedelta(hours=1)
    fresh = freshness_of(files, now)
    assert fresh.repositories["director"].missing == ("snapshot",)
    assert fresh.stale
    assert not fresh.repositories["catalogue"].stale


def test_a_cached_file_of_the_wrong_role_is_refused(fleet: Fleet) -> None:
    files = cached(fleet)
    files["catalogue"]["timestamp"] = files["catalogue"]["snapshot"]
    with pytest.raises(MetadataError, match="timestamp holds snapshot"):
        freshness_of(files, datetime.now().astimezone())


def test_now_must_carry_a_timezone(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="timezone"):
        freshness_of(cached(fleet), datetime(2026, 12, 3))
