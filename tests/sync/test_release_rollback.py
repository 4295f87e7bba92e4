"""A site goes back to the bundle it ran before, and to no other lower release counter."""

from __future__ import annotations

import json

import pytest

from fogline.sync import ReleaseRollbackError, StorageError

from .conftest import Fleet


def install(fleet: Fleet, name: str = "site-a") -> str:
    site = fleet.site(name)
    got = site.update()
    assert got is not None
    site.record_installed(got)
    return got.id


def test_a_site_rolls_back_to_exactly_the_bundle_it_ran_before(fleet: Fleet) -> None:
    first = fleet.release_to(["site-a"], version="1")
    assert install(fleet) == "tiny@1"
    second = fleet.release_to(["site-a"], version="2")
    assert install(fleet) == "tiny@2"
    fleet.director.assign(["site-a"], first)  # the rollout service rolls back
    site = fleet.site()
    got = site.update()
    assert got is not None
    assert got.release == first
    assert not got.installed
    site.record_installed(got)
    assert site.installed_releases() == {"tiny": 2}  # the highest stays
    running, previous = site.ran_bundles()
    assert running["tiny"].version == "1"
    assert previous["tiny"].version == "2"
    # and forward again: the higher counter was always allowed
    fleet.director.assign(["site-a"], second)
    assert install(fleet) == "tiny@2"


def test_a_rolled_back_site_keeps_running_its_bundle_at_every_later_refresh(
    fleet: Fleet,
) -> None:
    """After a rollback the site runs a bundle below its release floor, and the director
    keeps naming it: each later refresh finds it installed, not a refused rollback."""
    first = fleet.release_to(["site-a"], version="1")
    install(fleet)
    fleet.release_to(["site-a"], version="2")
    install(fleet)
    fleet.director.assign(["site-a"], first)
    assert install(fleet) == "tiny@1"
    for _ in range(2):
        site = fleet.site()
        decision = site.check()
        assert decision is not None
        assert decision.installed
        assert not decision.rollback
        got = site.update()
        assert got is not None
        assert got.installed
    running, previous = fleet.site().ran_bundles()
    assert running["tiny"].version == "1"
    assert previous["tiny"].version == "2"


def test_attack_director_pointing_at_an_older_release_than_the_previous_is_refused(
    fleet: Fleet,
) -> None:
    oldest = fleet.release_to(["site-a"], version="1")
    install(fleet)
    fleet.release_to(["site-a"], version="2")
    install(fleet)
    fleet.release_to(["site-a"], version="3")
    install(fleet)
    fleet.director.assign(["site-a"], oldest)  # a stolen director key: two steps back
    with pytest.raises(ReleaseRollbackError, match="not the bundle the site ran before"):
        fleet.site().update()
    running, _ = fleet.site().ran_bundles()
    assert running["tiny"].version == "3"


def test_attack_director_pointing_at_a_never_installed_older_release_is_refused(
    fleet: Fleet,
) -> None:
    never = fleet.publish(version="1")
    fleet.release_to(["site-a"], version="2")
    install(fleet)
    fleet.release_to(["site-a"], version="3")
    install(fleet)
    fleet.director.assign(["site-a"], never)
    with pytest.raises(ReleaseRollbackError):
        fleet.site().update()


def test_attack_after_a_rollback_the_site_cannot_be_walked_further_back(fleet: Fleet) -> None:
    v1 = fleet.release_to(["site-a"], version="1")
    install(fleet)
    v2 = fleet.release_to(["site-a"], version="2")
    install(fleet)
    fleet.release_to(["site-a"], version="3")
    install(fleet)
    fleet.director.assign(["site-a"], v2)
    assert install(fleet) == "tiny@2"  # previous of 3
    fleet.director.assign(["site-a"], v1)  # previous of the previous: refused
    with pytest.raises(ReleaseRollbackError):
        fleet.site().update()


def test_an_installed_json_without_running_or_previous_still_reads(fleet: Fleet) -> None:
    fleet.release_to(["site-a"], version="1")
    site = fleet.site()
    (site.state_dir / "installed.json").write_text(json.dumps({"releases": {"tiny": 1}}))
    assert site.ran_bundles() == ({}, {})
    got = site.update()
    assert got is not None
    assert got.installed  # same counter as recorded: what it runs
    site.record_installed(got)
    data = json.loads((site.state_dir / "installed.json").read_text())
    assert data["releases"] == {"tiny": 1}
    assert data["running"]["tiny"]["version"] == "1"


def test_a_damaged_previous_record_is_a_storage_error(fleet: Fleet) -> None:
    site = fleet.site()
    (site.state_dir / "installed.json").write_text(
        json.dumps({"releases": {}, "previous": {"tiny": {"version": "1"}}})
    )
    with pytest.raises(StorageError, match="previous"):
        site.state()
