"""Per-model batching with lanes: the pure policy under a fake clock, then the threaded
runner under a real bulk flood."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Sequence

import pytest

from fogline.cloud_service._config import LaneConfig, LaneConfigs, ModelConfig
from fogline.cloud_service._scheduler import (
    LaneBatch,
    LaneBatcher,
    LaneScheduler,
    Queued,
    SchedulerPolicy,
)
from fogline.cloud_service._serving import Lane
from fogline.cloud_service.errors import QueueFullError

INTER, STREAM, BULK = Lane.INTERACTIVE, Lane.STREAM, Lane.BULK


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance_ms(self, ms: float) -> float:
        self.now += ms / 1000.0
        return self.now


def big_lanes(items: int = 100_000, timeout_ms: float = 3_600_000.0) -> LaneConfigs:
    return LaneConfigs(
        interactive=LaneConfig(items, timeout_ms, 8),
        stream=LaneConfig(items, timeout_ms, 3),
        bulk=LaneConfig(items, timeout_ms, 1),
    )


def scheduler(**kw: object) -> LaneScheduler[str]:
    kw.setdefault("lanes", big_lanes())
    return LaneScheduler(SchedulerPolicy(**kw))  # type: ignore[arg-type]


def drain(s: LaneScheduler[str], now: float, limit: int = 10_000) -> list[LaneBatch[str]]:
    out = []
    for _ in range(limit):
        batch = s.poll(now).batch
        if batch is None:
            break
        out.append(batch)
    return out


# batch formation


def test_a_lone_request_runs_at_once_without_a_queue_delay() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8)
    s.add(INTER, "a", clock.now)
    batch = s.poll(clock.now).batch
    assert batch is not None
    assert batch.items == ("a",)
    assert batch.lane is INTER


def test_requests_wait_for_the_queue_delay_then_leave_together() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8, max_queue_delay_ms=2)
    s.add(INTER, "a", clock.now)
    clock.advance_ms(1)
    s.add(INTER, "b", clock.now)
    assert s.poll(clock.now).batch is None
    assert s.next_wakeup_s() == pytest.approx(clock.now + 0.001)
    assert s.poll(clock.advance_ms(0.999)).batch is None
    batch = s.poll(clock.advance_ms(0.001)).batch
    assert batch is not None
    assert batch.items == ("a", "b")
    assert len(s) == 0


def test_a_full_batch_leaves_before_the_delay() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=3, max_queue_delay_ms=1000)
    for item in "abcd":
        s.add(INTER, item, clock.now)
    batch = s.poll(clock.now).batch
    assert batch is not None
    assert batch.items == ("a", "b", "c")
    assert s.poll(clock.now).batch is None  # "d" waits for company or the delay


def test_a_preferred_size_is_formed_at_once_instead_of_waiting() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=16, max_queue_delay_ms=1000, preferred_batch_sizes=(4,))
    for i in range(3):
        s.add(INTER, str(i), clock.now)
    assert s.poll(clock.now).batch is None
    s.add(INTER, "3", clock.now)
    s.add(INTER, "4", clock.now)
    batch = s.poll(clock.now).batch
    assert batch is not None
    assert batch.items == ("0", "1", "2", "3")
    assert s.poll(clock.now).batch is None


def test_the_largest_reachable_preferred_size_is_chosen() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=16, max_queue_delay_ms=1000, preferred_batch_sizes=(2, 4, 8))
    for i in range(7):
        s.add(INTER, str(i), clock.now)
    sizes = [len(b) for b in drain(s, clock.now)]
    assert sizes == [4, 2]  # the last one waits for the delay
    late = s.poll(clock.advance_ms(1000)).batch
    assert late is not None
    assert len(late) == 1


def test_multi_row_requests_never_exceed_max_batch_size_in_rows() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8)
    for item, rows in (("a", 3), ("b", 3), ("c", 3), ("d", 8)):
        s.add(INTER, item, clock.now, rows=rows)
    batches = drain(s, clock.now)
    assert [(b.items, b.rows) for b in batches] == [
        (("a", "b"), 6),
        (("c",), 3),
        (("d",), 8),
    ]
    with pytest.raises(ValueError, match=r"1\.\.8 rows"):
        s.add(INTER, "too big", clock.now, rows=9)


def test_requests_of_different_shapes_never_share_a_batch() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8)
    for item, group in (("a", (3,)), ("b", (3,)), ("c", (5,)), ("d", (3,))):
        s.add(INTER, item, clock.now, group=group)
    assert [b.items for b in drain(s, clock.now)] == [("a", "b"), ("c",), ("d",)]


# deadlines and bounds


def test_a_request_whose_deadline_passes_in_the_queue_is_expired_not_served() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8, max_queue_delay_ms=1000)
    s.add(INTER, "late", clock.now, timeout_ms=100)
    s.add(INTER, "patient", clock.now, timeout_ms=5000)
    assert s.next_wakeup_s() == pytest.approx(clock.now + 0.1)
    polled = s.poll(clock.advance_ms(100))
    assert [e.item for e in polled.expired] == ["late"]
    assert polled.batch is None
    assert s.depth(INTER) == 1
    batch = s.poll(clock.advance_ms(900)).batch
    assert batch is not None
    assert batch.items == ("patient",)


def test_the_lane_timeout_applies_when_a_request_names_none() -> None:
    clock = FakeClock()
    lanes = LaneConfigs(bulk=LaneConfig(10, 50.0, 1))
    s = scheduler(max_batch_size=8, max_queue_delay_ms=1000, lanes=lanes)
    entry = s.add(BULK, "x", clock.now)
    assert entry.deadline_s == pytest.approx(clock.now + 0.05)
    polled = s.poll(clock.advance_ms(50))
    assert [e.item for e in polled.expired] == ["x"]


def test_an_expired_request_is_never_batched_even_when_its_batch_is_due() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=2, max_queue_delay_ms=10)
    s.add(INTER, "a", clock.now, timeout_ms=10)
    s.add(INTER, "b", clock.now, timeout_ms=1000)
    clock.advance_ms(10)  # "a" is due for a batch and past its deadline at once
    polled = s.poll(clock.now)
    assert [e.item for e in polled.expired] == ["a"]
    assert polled.batch is not None
    assert polled.batch.items == ("b",)


def test_a_full_lane_refuses_with_queue_full_while_other_lanes_accept() -> None:
    clock = FakeClock()
    lanes = LaneConfigs(interactive=LaneConfig(2, 1000.0, 8))
    s = scheduler(max_batch_size=8, max_queue_delay_ms=1000, lanes=lanes, retry_after_ms=250)
    s.add(INTER, "a", clock.now)
    s.add(INTER, "b", clock.now)
    with pytest.raises(QueueFullError) as info:
        s.add(INTER, "c", clock.now)
    assert info.value.retry_after_ms == 250
    assert info.value.depth == 2
    s.add(BULK, "bulk", clock.now)
    assert s.depth(BULK) == 1


def test_a_non_positive_timeout_is_refused() -> None:
    s = scheduler()
    with pytest.raises(ValueError, match="timeout_ms"):
        s.add(INTER, "x", 0.0, timeout_ms=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (8,)}, "preferred_batch_sizes"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"retry_after_ms": 0}, "retry_after_ms"),
    ],
)
def test_a_policy_with_impossible_bounds_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerPolicy(**kwargs)


def test_a_model_that_does_not_batch_schedules_one_request_at_a_time() -> None:
    policy = SchedulerPolicy.from_model_config(ModelConfig(preferred_batch_sizes=(4,)), 0)
    assert policy.max_batch_size == 1
    assert policy.preferred_batch_sizes == ()
    clock = FakeClock()
    s: LaneScheduler[str] = LaneScheduler(policy)
    for item in "abc":
        s.add(INTER, item, clock.now)
    assert [b.items for b in drain(s, clock.now)] == [("a",), ("b",), ("c",)]


# lane sharing


def backlog(s: LaneScheduler[str], lane: Lane, n: int, now: float) -> None:
    for i in range(n):
        s.add(lane, f"{lane.value}-{i}", now)


def lanes_of(batches: Sequence[LaneBatch[str]]) -> list[Lane]:
    return [b.lane for b in batches]


def test_under_full_load_batch_slots_go_8_3_1_in_a_smooth_interleave() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=1)
    for lane in (INTER, STREAM, BULK):
        backlog(s, lane, 500, clock.now)
    order = lanes_of([s.poll(clock.now).batch for _ in range(120)])  # type: ignore[misc]
    assert Counter(order) == {INTER: 80, STREAM: 30, BULK: 10}
    for start in range(0, 120, 12):  # every round of 12 slots holds each lane's share
        assert Counter(order[start : start + 12]) == {INTER: 8, STREAM: 3, BULK: 1}


def test_a_busy_interactive_lane_never_starves_bulk() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=4)
    backlog(s, BULK, 1000, clock.now)
    order = []
    for _ in range(900):
        if s.depth(INTER) < 8:  # interactive never runs dry
            backlog(s, INTER, 8, clock.now)
        batch = s.poll(clock.now).batch
        assert batch is not None
        order.append(batch.lane)
    assert Counter(order)[BULK] == 100
    gaps = [i for i, lane in enumerate(order) if lane is BULK]
    assert max(b - a for a, b in itertools.pairwise(gaps)) <= 9


def test_an_interactive_request_jumps_a_bulk_backlog() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=8)
    backlog(s, BULK, 5000, clock.now)
    for _ in range(50):
        assert s.poll(clock.now).batch is not None
    entry = s.add(INTER, "urgent", clock.now)
    batch = s.poll(clock.now).batch
    assert batch is not None
    assert batch.items == ("urgent",)
    assert batch.index - entry.formed_before == 0


def test_a_lone_lane_takes_every_slot() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=2)
    backlog(s, BULK, 20, clock.now)
    assert lanes_of(drain(s, clock.now)) == [BULK] * 10


def test_stream_outranks_bulk_but_leaves_it_a_share() -> None:
    clock = FakeClock()
    s = scheduler(max_batch_size=1)
    backlog(s, STREAM, 100, clock.now)
    backlog(s, BULK, 100, clock.now)
    order = lanes_of([s.poll(clock.now).batch for _ in range(40)])  # type: ignore[misc]
    assert Counter(order) == {STREAM: 30, BULK: 10}
    assert order[0] is STREAM


def test_lane_weights_come_from_the_config() -> None:
    clock = FakeClock()
    lanes = LaneConfigs(
        interactive=LaneConfig(1000, 1000.0, 1),
        stream=LaneConfig(1000, 1000.0, 1),
        bulk=LaneConfig(1000, 1000.0, 2),
    )
    s = scheduler(max_batch_size=1, lanes=lanes)
    for lane in (INTER, STREAM, BULK):
        backlog(s, lane, 100, clock.now)
    order = lanes_of([s.poll(clock.now).batch for _ in range(40)])  # type: ignore[misc]
    assert Counter(order) == {INTER: 10, STREAM: 10, BULK: 20}


# the threaded runner


class Recorder:
    """Batch and rejection callbacks that remember what they saw."""

    def __init__(self, compute_s: float = 0.0) -> None:
        self.batches: list[LaneBatch[str]] = []
        self.served_items: set[str] = set()
        self.expired: list[Queued[str]] = []
        self.done = threading.Condition()
        self._compute_s = compute_s

    def run(self, batch: LaneBatch[str]) -> None:
        if self._compute_s:
            threading.Event().wait(self._compute_s)  # stands in for a backend's compute
        with self.done:
            self.batches.append(batch)
            self.served_items.update(batch.items)
            self.done.notify_all()

    def reject(self, entries: Sequence[Queued[str]]) -> None:
        with self.done:
            self.expired.extend(entries)
            self.done.notify_all()

    def served(self) -> list[str]:
        with self.done:
            return [item for b in self.batches for item in b.items]


def test_the_runner_batches_what_arrives_and_drains_on_stop() -> None:
    rec = Recorder()
    runner: LaneBatcher[str] = LaneBatcher(
        SchedulerPolicy(max_batch_size=4, max_queue_delay_ms=10_000, lanes=big_lanes()),
        rec.run,
        rec.reject,
    )
    runner.start()
    for i in range(6):
        runner.submit(INTER, str(i))
    with rec.done:
        assert rec.done.wait_for(lambda: len(rec.batches) == 1, 10)
    assert rec.batches[0].items == ("0", "1", "2", "3")
    runner.stop()  # "4" and "5" would wait 10 s; stopping runs them now
    assert rec.served() == [str(i) for i in range(6)]
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit(INTER, "late")


def test_the_runner_rejects_a_request_past_its_deadline() -> None:
    rec = Recorder()
    runner: LaneBatcher[str] = LaneBatcher(
        SchedulerPolicy(max_batch_size=4, max_queue_delay_ms=10_000, lanes=big_lanes()),
        rec.run,
        rec.reject,
    )
    runner.start()
    runner.submit(INTER, "x", timeout_ms=20)
    with rec.done:
        assert rec.done.wait_for(lambda: rec.expired, 10)
    runner.stop()
    assert [e.item for e in rec.expired] == ["x"]
    assert rec.batches == []


def test_interactive_requests_keep_low_queue_times_while_a_bulk_flood_runs() -> None:
    """A bulk flood is kept topped up for the whole test; interactive requests arrive one
    at a time. Each must be served by the next batch formed after it arrives (at most one
    batch, the one already running, goes ahead of it), however deep the bulk queue."""
    rec = Recorder(compute_s=0.001)
    runner: LaneBatcher[str] = LaneBatcher(
        SchedulerPolicy(max_batch_size=8, lanes=big_lanes()), rec.run, rec.reject
    )
    runner.start()
    stop_flood = threading.Event()

    def flood() -> None:
        n = 0
        while not stop_flood.is_set():
            if runner.depth(BULK) < 400:
                for _ in range(100):
                    runner.submit(BULK, f"bulk-{n}")
                    n += 1
            else:
                stop_flood.wait(0.001)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        with rec.done:
            assert rec.done.wait_for(lambda: len(rec.batches) >= 20, 10)  # flood under way
        entries = []
        for i in range(30):
            entry = runner.submit(INTER, f"interactive-{i}")
            entries.append(entry)
            with rec.done:
                assert rec.done.wait_for(lambda e=entry: e.item in rec.served_items, 10)
    finally:
        stop_flood.set()
        flooder.join(10)
    bulk_waiting = runner.depth(BULK)
    runner.stop()
    index_of = {item: b.index for b in rec.batches for item in b.items}
    waits = [index_of[e.item] - e.formed_before for e in entries]
    assert max(waits) <= 1, waits
    assert bulk_waiting > 0  # the flood was still queued when the last interactive ran
    queue_ms = sorted(
        (b.formed_s - e.enqueued_s) * 1000
        for b in rec.batches
        for e in b.entries
        if e.lane is INTER
    )
    print(f"interactive queue time p50 {queue_ms[len(queue_ms) // 2]:.2f} ms")


def test_batches_never_exceed_the_size_and_the_rest_keeps_its_order() -> None:
    s = scheduler(max_batch_size=4)
    for i in range(10):
        s.add(STREAM, str(i), 0.0)
    batches = drain(s, 0.0)
    assert [b.items for b in batches] == [
        ("0", "1", "2", "3"),
        ("4", "5", "6", "7"),
        ("8", "9"),
    ]


def test_the_next_wakeup_follows_the_oldest_request_or_a_full_batch() -> None:
    s = scheduler(max_batch_size=3, max_queue_delay_ms=10)
    assert s.next_wakeup_s() is None
    s.add(STREAM, "a", 1.000)
    s.add(STREAM, "b", 1.004)
    assert s.next_wakeup_s() == pytest.approx(1.010)  # the oldest request's delay
    s.add(STREAM, "c", 1.005)
    assert s.next_wakeup_s() == pytest.approx(1.000)  # full: due since the oldest came


def test_each_request_keeps_the_time_it_was_queued() -> None:
    s = scheduler(max_batch_size=8, max_queue_delay_ms=5)
    for i, t in enumerate((2.000, 2.001, 2.003)):
        s.add(STREAM, str(i), t)
    batch = s.poll(2.010).batch
    assert batch is not None
    assert [e.enqueued_s for e in batch.entries] == [2.000, 2.001, 2.003]
    assert batch.formed_s == 2.010


def test_submitting_wakes_the_runner_only_when_a_batch_gets_due_sooner() -> None:
    rec = Recorder()
    runner: LaneBatcher[str] = LaneBatcher(
        SchedulerPolicy(max_batch_size=4, max_queue_delay_ms=5_000, lanes=big_lanes()),
        rec.run,
        rec.reject,
    )
    cond = runner._cond
    wakes = 0
    submitter = threading.get_ident()
    notify_all = cond.notify_all

    def counting_notify_all() -> None:
        nonlocal wakes
        if threading.get_ident() == submitter:
            wakes += 1
        notify_all()

    cond.notify_all = counting_notify_all  # type: ignore[method-assign]
    runner.start()
    runner.submit(STREAM, "0")  # the first request: due in 5 s, sooner than never
    for _ in range(1000):  # until it sleeps until that request's delay ends
        if runner._sleeping_until not in (None, float("inf")):
            break
        threading.Event().wait(0.005)
    for i in (1, 2):
        runner.submit(STREAM, str(i))  # join a batch already due at the same moment
    assert wakes == 1
    runner.submit(STREAM, "3")  # fills the batch: due now
    with rec.done:
        assert rec.done.wait_for(lambda: len(rec.batches) == 1, 2)  # long before 5 s
    assert wakes == 2
    assert rec.batches[0].items == ("0", "1", "2", "3")
    runner.stop()


def test_a_failing_batch_is_counted_and_does_not_stop_the_runner() -> None:
    rec = Recorder()

    def run(batch: LaneBatch[str]) -> None:
        if "boom" in batch.items:
            raise RuntimeError("a bug in the callback")
        rec.run(batch)

    runner: LaneBatcher[str] = LaneBatcher(
        SchedulerPolicy(max_batch_size=1, lanes=big_lanes()), run, rec.reject
    )
    runner.start()
    runner.submit(STREAM, "boom")
    runner.submit(STREAM, "after")
    with rec.done:
        assert rec.done.wait_for(lambda: rec.served_items == {"after"}, 10)
    assert runner.failures == 1
    runner.stop()
