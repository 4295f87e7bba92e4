"""The load / unload policy of bundles on demand, on a fake clock (plain numbers)."""

from __future__ import annotations

import pytest

from fogline.cloud_service import LoadPlan, LoadPolicy


def test_a_wanted_version_that_is_not_loaded_is_loaded() -> None:
    policy = LoadPolicy(static={"tiny@1"})
    plan = policy.plan(0.0, wanted={"tiny@2", "tiny@3"}, loaded={"tiny@1", "tiny@3"})
    assert plan == LoadPlan(load=("tiny@2",), unload=())


def test_a_version_no_longer_wanted_is_unloaded_only_after_the_grace_period() -> None:
    policy = LoadPolicy(static={"tiny@1"}, grace_s=600.0)
    loaded = {"tiny@1", "tiny@2"}
    assert policy.plan(0.0, wanted={"tiny@2"}, loaded=loaded).unload == ()
    # wanted until t=100, then no more: the grace counts from there
    assert policy.plan(100.0, wanted={"tiny@2"}, loaded=loaded).unload == ()
    assert policy.plan(650.0, wanted=set(), loaded=loaded).unload == ()
    assert policy.plan(699.0, wanted=set(), loaded=loaded).unload == ()
    assert policy.plan(700.0, wanted=set(), loaded=loaded) == LoadPlan(unload=("tiny@2",))


def test_a_version_that_serves_messages_is_not_unloaded_though_no_site_is_told_to_run_it() -> None:
    policy = LoadPolicy(grace_s=600.0)
    loaded = {"tiny@2"}
    assert policy.plan(0.0, wanted=set(), loaded=loaded, last_served={"tiny@2": 0.0}).unload == ()
    served = {"tiny@2": 500.0}
    assert policy.plan(1000.0, wanted=set(), loaded=loaded, last_served=served).unload == ()
    assert policy.plan(1100.0, wanted=set(), loaded=loaded, last_served=served).unload == (
        "tiny@2",
    )


def test_a_static_version_is_never_unloaded() -> None:
    policy = LoadPolicy(static={"tiny@1"}, grace_s=0.0)
    for now in (0.0, 1e6, 1e9):
        assert policy.plan(now, wanted=set(), loaded={"tiny@1"}).unload == ()


def test_a_version_first_seen_loaded_gets_the_whole_grace_period() -> None:
    # loaded by someone else (the inference API's repository endpoint): idle from when seen
    policy = LoadPolicy(grace_s=600.0)
    assert policy.plan(5000.0, wanted=set(), loaded={"tiny@4"}).unload == ()
    assert policy.plan(5599.0, wanted=set(), loaded={"tiny@4"}).unload == ()
    assert policy.plan(5600.0, wanted=set(), loaded={"tiny@4"}).unload == ("tiny@4",)


def test_a_failed_load_is_not_tried_again_before_the_retry_period() -> None:
    policy = LoadPolicy(retry_s=60.0)
    policy.failed("tiny@2", 10.0)
    assert not policy.may_load("tiny@2", 69.0)
    assert policy.plan(69.0, wanted={"tiny@2"}, loaded=set()).load == ()
    assert policy.plan(70.0, wanted={"tiny@2"}, loaded=set()).load == ("tiny@2",)


def test_an_unloaded_version_loaded_again_starts_a_new_grace_period() -> None:
    policy = LoadPolicy(grace_s=10.0)
    assert policy.plan(0.0, wanted=set(), loaded={"tiny@2"}).unload == ()
    assert policy.plan(10.0, wanted=set(), loaded={"tiny@2"}).unload == ("tiny@2",)
    assert policy.plan(11.0, wanted=set(), loaded=set()) == LoadPlan()
    # back (a late message): the old idle time is forgotten
    assert policy.plan(500.0, wanted=set(), loaded={"tiny@2"}).unload == ()
    assert policy.plan(510.0, wanted=set(), loaded={"tiny@2"}).unload == ("tiny@2",)


@pytest.mark.parametrize("grace_s", [-1.0, float("nan"), float("inf")])
def test_a_grace_period_that_is_not_a_finite_number_of_seconds_is_refused(grace_s: float) -> None:
    with pytest.raises(ValueError, match="grace"):
        LoadPolicy(grace_s=grace_s)
