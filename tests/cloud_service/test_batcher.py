"""Batch formation (pure, driven by a fake clock) and the threaded runner around it."""

from __future__ import annotations

import threading

import pytest

from fogline.cloud_service import Batch, BatchFormer, BatchPolicy, BatchRunner, QueueFullError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def advance_ms(self, ms: float) -> float:
        self.now += ms / 1000.0
        return self.now


def former(**kw: float) -> BatchFormer[str]:
    return BatchFormer(BatchPolicy(**kw))  # type: ignore[arg-type]


def test_items_wait_for_the_queue_delay_then_leave_together() -> None:
    clock = FakeClock()
    f = former(max_batch_size=8, max_queue_delay_ms=2)
    f.add("b@1", "x", clock.now)
    clock.advance_ms(1)
    f.add("b@1", "y", clock.now)
    assert f.pop_ready(clock.now) is None
    assert f.pop_ready(clock.advance_ms(0.999)) is None
    batch = f.pop_ready(clock.advance_ms(0.001))
    assert batch is not None
    assert batch.items == ("x", "y")
    assert batch.key == "b@1"
    assert len(f) == 0


def test_a_full_batch_leaves_at_once_without_waiting() -> None:
    clock = FakeClock()
    f = former(max_batch_size=3, max_queue_delay_ms=1000)
    for item in "abc":
        f.add("b@1", item, clock.now)
    batch = f.pop_ready(clock.now)
    assert batch is not None
    assert batch.items == ("a", "b", "c")


def test_batches_never_exceed_the_size_and_the_rest_keeps_its_order() -> None:
    clock = FakeClock()
    f = former(max_batch_size=4, max_queue_delay_ms=5)
    for i in range(10):
        f.add("b@1", str(i), clock.now)
    first = f.pop_ready(clock.now)
    second = f.pop_ready(clock.now)
    assert first is not None
    assert second is not None
    assert first.items == ("0", "1", "2", "3")
    assert second.items == ("4", "5", "6", "7")
    assert f.pop_ready(clock.now) is None  # two left, not full, not old enough
    last = f.pop_ready(clock.advance_ms(5))
    assert last is not None
    assert last.items == ("8", "9")


def test_items_for_different_bundles_never_share_a_batch() -> None:
    clock = FakeClock()
    f = former(max_batch_size=10, max_queue_delay_ms=1)
    for i in range(6):
        f.add("a@1" if i % 2 else "b@1", str(i), clock.now)
    clock.advance_ms(1)
    got: list[Batch[str]] = []
    while (batch := f.pop_ready(clock.now)) is not None:
        got.append(batch)
    assert {b.key: b.items for b in got} == {"b@1": ("0", "2", "4"), "a@1": ("1", "3", "5")}


def test_the_bundle_that_waited_longest_goes_first() -> None:
    clock = FakeClock()
    f = former(max_batch_size=10, max_queue_delay_ms=2)
    f.add("late@1", "l", clock.advance_ms(1))
    f.add("early@1", "e", clock.now - 0.0005)  # queued half a millisecond earlier
    clock.advance_ms(5)
    first = f.pop_ready(clock.now)
    assert first is not None
    assert first.key == "early@1"


def test_a_full_queue_refuses_with_a_retry_hint_and_accepts_again_once_drained() -> None:
    clock = FakeClock()
    f = former(max_batch_size=2, max_queue_delay_ms=1, max_queue_items=3, retry_after_ms=250)
    for item in "abc":
        f.add("b@1", item, clock.now)
    with pytest.raises(QueueFullError) as err:
        f.add("other@1", "d", clock.now)
    assert err.value.retry_after_ms == 250
    assert err.value.depth == 3
    assert len(f) == 3
    assert f.pop_ready(clock.now) is not None  # a full batch of two leaves
    f.add("other@1", "d", clock.now)
    assert len(f) == 2


def test_zero_delay_releases_each_item_at_once() -> None:
    clock = FakeClock()
    f = former(max_batch_size=8, max_queue_delay_ms=0)
    f.add("b@1", "a", clock.now)
    batch = f.pop_ready(clock.now)
    assert batch is not None
    assert batch.items == ("a",)


def test_the_next_due_time_follows_the_oldest_item_or_a_full_batch() -> None:
    clock = FakeClock()
    f = former(max_batch_size=2, max_queue_delay_ms=4)
    assert f.next_due_s() is None
    t0 = clock.now
    f.add("a@1", "x", t0)
    assert f.next_due_s() == pytest.approx(t0 + 0.004)
    f.add("b@1", "y", clock.advance_ms(1))
    f.add("b@1", "z", clock.now)  # b is full: due as soon as it filled
    assert f.next_due_s() == pytest.approx(t0 + 0.001)


def test_adding_wakes_the_consumer_only_when_a_batch_gets_due_sooner() -> None:
    f = former(max_batch_size=3, max_queue_delay_ms=4)
    assert f.add("a@1", "1", 0.0) is True  # first item: a new deadline
    assert f.add("a@1", "2", 0.0) is False
    assert f.add("a@1", "3", 0.0) is True  # the batch is full
    assert f.add("b@1", "1", 0.0) is True


def test_forced_pop_takes_waiting_items_before_they_are_due() -> None:
    f = former(max_batch_size=8, max_queue_delay_ms=1000)
    f.add("a@1", "1", 0.0)
    assert f.pop_ready(0.0) is None
    batch = f.pop_ready(0.0, force=True)
    assert batch is not None
    assert batch.items == ("1",)


def test_each_item_keeps_the_time_it_was_queued() -> None:
    f = former(max_batch_size=8, max_queue_delay_ms=1)
    f.add("a@1", "1", 1.0)
    f.add("a@1", "2", 1.0005)
    batch = f.pop_ready(1.002)
    assert batch is not None
    assert batch.enqueued_s == (1.0, 1.0005)
    assert batch.formed_s == 1.002


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_queue_delay_ms": float("inf")}, "max_queue_delay_ms"),
        ({"max_queue_items": 0}, "max_queue_items"),
        ({"retry_after_ms": 0}, "retry_after_ms"),
    ],
)
def test_a_policy_that_cannot_work_is_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_runner_hands_every_item_over_once_in_order_per_bundle() -> None:
    got: list[Batch[int]] = []
    done = threading.Event()
    total = 300

    def handle(batch: Batch[int]) -> None:
        got.append(batch)
        if sum(len(b) for b in got) == total:
            done.set()

    runner: BatchRunner[int] = BatchRunner(
        BatchPolicy(max_batch_size=16, max_queue_delay_ms=1), handle
    )
    runner.start()
    try:
        for i in range(total):
            runner.submit("even@1" if i % 2 == 0 else "odd@1", i)
        assert done.wait(10)
    finally:
        runner.stop()
    assert all(len(b) <= 16 for b in got)
    for key, parity in (("even@1", 0), ("odd@1", 1)):
        items = [i for b in got if b.key == key for i in b.items]
        assert items == [i for i in range(total) if i % 2 == parity]
        assert all(i % 2 == parity for b in got if b.key == key for i in b.items)


def test_stopping_the_runner_answers_what_is_still_queued() -> None:
    got: list[int] = []
    runner: BatchRunner[int] = BatchRunner(
        BatchPolicy(max_batch_size=100, max_queue_delay_ms=60_000),
        lambda batch: got.extend(batch.items),
    )
    runner.start()
    for i in range(5):
        runner.submit("b@1", i)
    runner.stop()
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit("b@1", 5)


def test_a_failing_batch_does_not_stop_the_runner() -> None:
    got: list[int] = []

    def handle(batch: Batch[int]) -> None:
        if 0 in batch.items:
            raise RuntimeError("boom")
        got.extend(batch.items)

    runner: BatchRunner[int] = BatchRunner(
        BatchPolicy(max_batch_size=1, max_queue_delay_ms=0), handle
    )
    runner.start()
    try:
        runner.submit("b@1", 0)
        runner.submit("b@1", 1)
        assert runner.wait_idle(5)
    finally:
        runner.stop()
    assert got == [1]
