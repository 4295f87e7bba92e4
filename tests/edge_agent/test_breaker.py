"""The circuit breaker alone: pure state changes driven by fake monotonic times."""

from __future__ import annotations

import pytest

from fogline.edge_agent._breaker import STATE_CODES, CircuitBreaker


def _opened(threshold: int = 3, open_s: float = 10.0, max_open_s: float = 60.0) -> CircuitBreaker:
    """A breaker opened at t=0 by ``threshold`` consecutive timeouts."""
    breaker = CircuitBreaker(failure_threshold=threshold, open_s=open_s, max_open_s=max_open_s)
    for _ in range(threshold):
        breaker.record_timeout(0.0)
    assert breaker.state == "open"
    return breaker


def test_a_new_breaker_is_closed_and_lets_every_caller_wait() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    assert breaker.state == "closed"
    assert all(breaker.allow_wait(float(t)) for t in range(5))
    assert breaker.transitions == 0


def test_the_breaker_opens_after_threshold_consecutive_timeouts_and_not_before() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_s=10.0)
    breaker.record_timeout(1.0)
    breaker.record_timeout(2.0)
    assert breaker.state == "closed"
    assert breaker.allow_wait(2.0)
    breaker.record_timeout(3.0)
    assert breaker.state == "open"
    assert not breaker.allow_wait(3.0)
    assert not breaker.allow_wait(12.9)  # open for open_s from the last timeout
    assert breaker.transitions == 1


def test_a_success_resets_the_count_of_consecutive_timeouts() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    for t in (1.0, 2.0):
        breaker.record_timeout(t)
    breaker.record_success()
    for t in (3.0, 4.0):
        breaker.record_timeout(t)
    assert breaker.state == "closed"
    breaker.record_timeout(5.0)
    assert breaker.state == "open"


def test_after_the_open_time_exactly_one_probe_may_wait() -> None:
    breaker = _opened(open_s=10.0)
    assert not breaker.allow_wait(9.99)
    assert breaker.state == "open"
    assert breaker.allow_wait(10.0)  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow_wait(10.0)
    assert not breaker.allow_wait(500.0)  # still one probe out, however long it takes


def test_a_probe_timeout_reopens_for_twice_as_long_capped_at_the_maximum() -> None:
    breaker = _opened(open_s=10.0, max_open_s=25.0)
    assert breaker.allow_wait(10.0)
    breaker.record_timeout(11.0)  # the probe timed out: open for 20 s
    assert breaker.state == "open"
    assert not breaker.allow_wait(30.99)
    assert breaker.allow_wait(31.0)
    breaker.record_timeout(32.0)  # again: 40 s, capped at 25 s
    assert breaker.state == "open"
    assert not breaker.allow_wait(56.99)
    assert breaker.allow_wait(57.0)
    breaker.record_timeout(58.0)  # stays at the cap
    assert not breaker.allow_wait(82.99)
    assert breaker.allow_wait(83.0)
    assert breaker.state == "half_open"


def test_a_success_in_half_open_closes_and_restores_the_first_open_time() -> None:
    breaker = _opened(threshold=2, open_s=10.0, max_open_s=100.0)
    assert breaker.allow_wait(10.0)
    breaker.record_timeout(10.5)  # reopened for 20 s
    assert breaker.allow_wait(30.5)
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow_wait(31.0)
    assert breaker.allow_wait(31.0)  # closed: any number of callers wait
    # Opening again starts from open_s, not from the doubled time.
    breaker.record_timeout(40.0)
    breaker.record_timeout(41.0)
    assert breaker.state == "open"
    assert not breaker.allow_wait(50.99)
    assert breaker.allow_wait(51.0)


def test_any_answer_from_the_cloud_closes_an_open_breaker() -> None:
    breaker = _opened()
    breaker.record_success()  # a re-sent item's answer, no probe needed
    assert breaker.state == "closed"
    assert breaker.allow_wait(0.0)


def test_force_open_opens_at_once_and_counts_one_transition() -> None:
    breaker = CircuitBreaker(failure_threshold=5, open_s=2.0)
    breaker.force_open(1.0)
    breaker.force_open(1.5)  # already open: no new deadline
    assert breaker.state == "open"
    assert breaker.transitions == 1
    assert not breaker.allow_wait(2.99)
    assert breaker.allow_wait(3.0)


def test_state_codes_match_the_circuit_state_gauge() -> None:
    assert STATE_CODES == {"closed": 0, "open": 1, "half_open": 2}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be at least 1"),
        ({"open_s": 0.0}, "0 < open_s <= max_open_s"),
        ({"open_s": 10.0, "max_open_s": 5.0}, "0 < open_s <= max_open_s"),
    ],
)
def test_a_breaker_with_impossible_settings_is_refused(
    kwargs: dict[str, float], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
