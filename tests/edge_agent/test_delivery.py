"""The agent's delivery core with a fake clock: times are plain numbers handed in."""

from __future__ import annotations

import pytest

from fogline.compression import ResultStatus
from fogline.edge_agent._breaker import CircuitBreaker
from fogline.edge_agent._delivery import DeliveryCore, DeliveryPolicy, Pending


class Draws:
    """A random source that records each range asked for and answers its upper end."""

    def __init__(self) -> None:
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return b


def _mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _core(
    *,
    timeout_s: float = 2.0,
    retry_initial_s: float = 1.0,
    retry_max_s: float = 4.0,
    rate: float = 1000.0,
    degrade: bool = True,
    jitter: float = 0.0,
    breaker: CircuitBreaker | None = None,
    rng: Draws | None = None,
) -> DeliveryCore[str]:
    policy = DeliveryPolicy(timeout_s, retry_initial_s, retry_max_s, rate, degrade, jitter)
    return DeliveryCore(policy, breaker or CircuitBreaker(failure_threshold=3), rng or Draws())


def _admit(
    core: DeliveryCore[str],
    *ns: int,
    now: float = 0.0,
    connected: bool = True,
    gone: frozenset[bytes] = frozenset(),
    label: int | None = 7,
) -> list[str]:
    """Admit items ``ns`` with callers ``caller-<n>``; the payloads to send, decoded."""
    items = [
        (_mid(n), f"payload-{n}".encode(), Pending[str](None, 0.0, 0.5, 0.9, label), f"caller-{n}")
        for n in ns
    ]
    core.journal_started(len(items))
    admitted = core.admit(items, gone, now, connected=connected)
    core.journal_done(len(items))
    return [p.decode() for p in admitted.send]


def _due(core: DeliveryCore[str], now: float, connected: bool = True) -> list[tuple[int, bool]]:
    return [(int.from_bytes(m, "big"), again) for m, again in core.due(now, connected=connected)]


def test_an_unanswered_item_is_resent_with_doubling_backoff_up_to_the_cap() -> None:
    core = _core()
    assert _admit(core, 1) == ["payload-1"]
    _due(core, 0.0)  # starts the rate clock
    assert _due(core, 0.99) == []
    sends = [t for t in (1.0, 2.9, 3.0, 6.9, 7.0, 10.9, 11.0, 15.0) if _due(core, t)]
    # 1 s after the first send, then 2 s, then the 4 s cap, again and again.
    assert sends == [1.0, 3.0, 7.0, 11.0, 15.0]
    assert core.get(_mid(1)) is not None
    assert core.get(_mid(1)).attempts == 6  # type: ignore[union-attr]


def test_every_delay_is_drawn_from_the_injected_random_source_within_the_jitter() -> None:
    draws = Draws()
    core = _core(jitter=0.2, rng=draws)
    _admit(core, 1)
    assert draws.asked == [(0.8, 1.2)]
    _due(core, 0.0)
    assert _due(core, 1.19) == []
    assert _due(core, 1.2) == [(1, True)]  # the draw answered the top of the range
    assert draws.asked[-1] == (0.8, 1.2)
    assert _due(core, 1.2 + 2.4) == [(1, True)]


def test_items_stored_while_unconnected_are_first_sent_on_connection_not_as_resends() -> None:
    core = _core()
    items = [(_mid(1), b"p", Pending[str](None, 0.0), "caller-1")]
    admitted = core.admit(items, frozenset(), 0.0, connected=False)
    assert admitted.send == []
    assert [(m, c) for m, _p, c in admitted.unserved] == [(_mid(1), "caller-1")]
    assert admitted.why == "not connected to the broker"
    core.due(0.0, connected=False)
    assert _due(core, 5.0, connected=False) == []  # nothing goes out while unconnected
    assert _due(core, 5.1) == [(1, False)]  # its first send
    assert _due(core, 6.1) == [(1, True)]  # then re-sends


def test_a_busy_answer_moves_the_next_send_to_the_clouds_retry_after() -> None:
    core = _core(retry_initial_s=3.0, retry_max_s=60.0)
    _admit(core, 1, 2)
    _due(core, 0.0)
    action = core.on_result(_mid(1), ResultStatus.BUSY, 0.5, retry_after_ms=200)
    assert action.kind == "busy"
    assert action.pending is core.get(_mid(1))
    assert action.pending is not None
    assert action.pending.busy
    assert _due(core, 0.69) == []
    assert _due(core, 0.7) == [(1, True)]
    # Without a hint the agent's own first delay applies; the old schedule is void.
    assert core.on_result(_mid(2), ResultStatus.BUSY, 1.0).kind == "busy"
    assert _due(core, 3.0) == []  # the first schedule of both is void
    assert [n for n, _ in _due(core, 3.99)] == []
    assert [n for n, _ in _due(core, 4.0)] == [2]


def test_busy_backoffs_are_never_earlier_than_the_cloud_asked() -> None:
    draws = Draws()
    core = _core(jitter=0.2, rng=draws)
    _admit(core, 1)
    core.on_result(_mid(1), ResultStatus.BUSY, 0.0, retry_after_ms=1000)
    assert draws.asked[-1] == (1, 1.4)


def test_a_caller_stops_waiting_at_its_deadline_and_the_item_stays_pending() -> None:
    breaker = CircuitBreaker(failure_threshold=5)
    core = _core(timeout_s=2.0, breaker=breaker)
    _admit(core, 1, 2, now=10.0)
    assert core.expire_waits(11.99) == []
    expired = core.expire_waits(12.0)
    assert [(m, c) for m, _p, c in expired] == [(_mid(1), "caller-1"), (_mid(2), "caller-2")]
    assert all(p.waiter is None for _m, p, _c in expired)
    assert len(core) == 2  # re-sent until answered; the outcome goes to on_answer
    assert core.expire_waits(100.0) == []  # each caller expires once
    # The answer that follows has no caller to go to.
    action = core.on_result(_mid(1), ResultStatus.OK, 13.0)
    assert (action.kind, action.waiter) == ("final", None)


def test_an_answered_callers_deadline_passes_without_effect() -> None:
    core = _core(timeout_s=2.0)
    _admit(core, 1)
    action = core.on_result(_mid(1), ResultStatus.OK, 1.0)
    assert (action.kind, action.waiter) == ("final", "caller-1")
    assert core.expire_waits(5.0) == []


def test_a_caller_that_stops_waiting_degrades_only_with_an_edge_answer_and_the_policy() -> None:
    with_label: Pending[str] = Pending(None, 0.0, label=3)
    without: Pending[str] = Pending(None, 0.0)
    assert _core(degrade=True).degrades(with_label)
    assert not _core(degrade=True).degrades(without)
    assert not _core(degrade=False).degrades(with_label)


def test_timeouts_open_the_breaker_then_one_probe_waits_and_an_answer_closes_it() -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_s=5.0, max_open_s=20.0)
    core = _core(timeout_s=1.0, breaker=breaker)
    _admit(core, 1, 2, now=0.0)
    core.expire_waits(1.0)
    assert breaker.state == "open"
    # Open: nobody waits, everything is still sent.
    items = [(_mid(3), b"p3", Pending[str](None, 0.0), "caller-3")]
    admitted = core.admit(items, frozenset(), 2.0, connected=True)
    assert admitted.send == [b"p3"]
    assert [c for _m, _p, c in admitted.unserved] == ["caller-3"]
    assert admitted.why == "circuit breaker open"
    # After open_s: half open, one probe waits, the next caller does not.
    items = [
        (_mid(4), b"p4", Pending[str](None, 0.0), "caller-4"),
        (_mid(5), b"p5", Pending[str](None, 0.0), "caller-5"),
    ]
    admitted = core.admit(items, frozenset(), 6.0, connected=True)
    assert breaker.state == "half_open"
    assert [c for _m, _p, c in admitted.unserved] == ["caller-5"]
    # The probe times out: open again, for twice as long.
    assert [c for _m, _p, c in core.expire_waits(7.0)] == ["caller-4"]
    assert breaker.state == "open"
    assert not breaker.allow_wait(16.9)
    # Any answer of a pending item closes it.
    core.on_result(_mid(3), ResultStatus.OK, 8.0)
    assert breaker.state == "closed"


def test_resends_drain_at_the_configured_rate_with_a_bounded_burst() -> None:
    # 16/s: one every 1/16 s, a burst of at most a fifth of a second's worth (3.2).
    core = _core(rate=16.0, retry_initial_s=1.0, retry_max_s=100.0)
    _admit(core, *range(1, 9))
    assert _due(core, 0.0) == []  # the first call only starts the clock
    assert len(_due(core, 1.0)) == 3
    assert len(_due(core, 1.0625)) == 1
    assert len(_due(core, 1.09375)) == 0
    assert len(_due(core, 1.125)) == 1
    # A long pause does not save up a flood.
    assert len(_due(core, 50.0)) == 3


def test_the_budget_grows_while_unconnected_but_only_to_the_burst() -> None:
    core = _core(rate=16.0)
    _admit(core, *range(1, 6))
    core.due(0.0, connected=False)
    assert core.due(30.0, connected=False) == []
    assert len(_due(core, 30.0)) == 3


def test_a_result_for_an_unknown_or_already_answered_id_is_a_duplicate() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    core = _core(breaker=breaker)
    breaker.record_timeout(0.0)
    assert breaker.state == "open"
    unknown = core.on_result(_mid(99), ResultStatus.OK, 1.0)
    assert unknown == ("unknown", None, None)
    assert breaker.state == "open"  # a stranger's result is no sign of life
    _admit(core, 1)
    first = core.on_result(_mid(1), ResultStatus.ERROR, 1.0)
    assert first.kind == "final"
    assert not core.drained()  # its delete is in the journal's hands
    core.journal_done(1)
    assert core.drained()
    assert core.on_result(_mid(1), ResultStatus.OK, 1.1).kind == "unknown"
    assert core.on_result(_mid(1), ResultStatus.BUSY, 1.2).kind == "unknown"
    assert core.on_result(_mid(1), None, 1.3).kind == "unknown"


def test_a_malformed_result_ends_the_item() -> None:
    core = _core()
    _admit(core, 1)
    action = core.on_result(_mid(1), None, 1.0)
    assert (action.kind, action.waiter) == ("final", "caller-1")
    assert _mid(1) not in core
    assert _due(core, 100.0) == []


def test_an_item_evicted_as_it_is_stored_keeps_its_caller_and_is_not_sent() -> None:
    core = _core()
    assert _admit(core, 1, 2, gone=frozenset({_mid(2)})) == ["payload-1"]
    [(mid, _p, caller)] = core.evict([_mid(2), _mid(42)])
    assert (mid, caller) == (_mid(2), "caller-2")
    assert core.expire_waits(100.0) == [(_mid(1), core.get(_mid(1)), "caller-1")]


def test_a_quarantined_item_is_taken_with_its_caller_and_never_sent_or_answered_again() -> None:
    core = _core()
    _admit(core, 1, 2)
    [(mid, p, caller)] = core.take([_mid(1)])
    assert (mid, caller, p.waiter) == (_mid(1), "caller-1", None)
    assert core.take([_mid(1)]) == []  # one outcome only
    _due(core, 0.0)
    assert _due(core, 1.0) == [(2, True)]  # item 1 is not re-sent
    assert core.on_result(_mid(1), ResultStatus.OK, 1.5).kind == "unknown"
    assert [m for m, _p, _c in core.expire_waits(100.0)] == [_mid(2)]


def test_recovered_items_are_spread_over_the_rate_and_each_send_is_a_resend() -> None:
    core = _core(rate=64.0)  # one every 1/64 s
    assert core.recover([(_mid(n), f"t{n}", 0.0) for n in (1, 2, 3)], 4.0) == 3
    p = core.get(_mid(3))
    assert p is not None
    assert p.recovered
    assert p.tag == "t3"
    assert p.waiter is None
    _due(core, 4.0)
    assert _due(core, 4.015625) == [(1, True)]
    assert _due(core, 4.03125) == [(2, True)]
    assert _due(core, 4.046875) == [(3, True)]


def test_stopping_takes_every_waiting_caller_once() -> None:
    core = _core()
    _admit(core, 1, 2)
    core.on_result(_mid(1), ResultStatus.OK, 0.5)
    assert core.take_waiters() == ["caller-2"]
    assert core.take_waiters() == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"timeout_s": 0.0}, ValueError),
        ({"retry_initial_s": -1.0}, ValueError),
        ({"retry_max_s": 0.5}, ValueError),  # below retry_initial_s
        ({"resend_rate_per_s": 0}, ValueError),
        ({"jitter": 1.0}, ValueError),
        ({"timeout_s": "2"}, TypeError),
        ({"degrade": "yes"}, TypeError),
    ],
)
def test_a_bad_delivery_policy_is_refused(kwargs: dict[str, object], error: type) -> None:
    values: dict[str, object] = {
        "timeout_s": 2.0,
        "retry_initial_s": 1.0,
        "retry_max_s": 4.0,
        "resend_rate_per_s": 10.0,
        "degrade": True,
    }
    with pytest.raises(error):
        DeliveryPolicy(**{**values, **kwargs})  # type: ignore[arg-type]
