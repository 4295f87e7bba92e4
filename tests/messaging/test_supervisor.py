"""The thread supervisor on its own: what escapes a thread is logged, counted, and either
carried on from (with a doubling backoff) or kept as the owner's failure for good."""

from __future__ import annotations

import logging
import threading

import pytest

from fogline.messaging import Supervisor, ThreadFailure

LOGGER = "tests.supervisor"


class FakeHalt(threading.Event):
    """A halt event whose waits return at once and are recorded; set after ``rounds``."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return len(self.waits) >= self.rounds


def supervisor(**kwargs: float) -> Supervisor:
    return Supervisor("test owner", logging.getLogger(LOGGER), **kwargs)


def test_a_carry_on_thread_is_entered_again_with_a_doubling_capped_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    sup = supervisor(backoff_initial_s=0.05, backoff_max_s=0.3)
    calls = 0

    def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a permanent fault")

    halt = FakeHalt(rounds=6)
    sup.run("loop", always_fails, False, halt)
    assert calls == 6
    assert halt.waits == [0.05, 0.1, 0.2, 0.3, 0.3, 0.3]
    assert sup.counts() == {"loop": 6}
    assert sup.failed is None
    lines = [r.getMessage() for r in caplog.records]
    assert "test owner: the loop thread failed: RuntimeError: a permanent fault" in lines[0]
    assert "carrying on" in lines[0]


def test_a_carry_on_thread_that_recovers_runs_on_and_returns_normally() -> None:
    sup = supervisor()
    calls = 0

    def fails_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("one bad iteration")

    sup.run("loop", fails_once, False, FakeHalt(rounds=99))
    assert calls == 2
    assert sup.counts() == {"loop": 1}
    assert sup.failed is None


def test_a_fatal_thread_is_kept_as_the_owners_failure_and_hooks_hear_of_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    sup = supervisor()
    heard: list[ThreadFailure] = []
    sup.on_fatal(heard.append)

    def dies() -> None:
        exc = RuntimeError("state lost")
        exc.add_note("while writing 3 results (a/1, a/2, a/3)")
        raise exc

    thread = sup.thread("writer", dies, fatal=True, name="t-writer")
    thread.start()
    thread.join(10)
    sup.run("writer", dies, True)  # a second failure does not replace the first
    failed = sup.failed
    assert failed is not None
    assert (failed.owner, failed.kind) == ("test owner", "writer")
    assert str(failed) == "the writer thread of test owner failed: RuntimeError: state lost"
    assert heard == [failed]
    assert sup.counts() == {"writer": 2}
    (line, *_) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "while writing 3 results (a/1, a/2, a/3)" in line.getMessage()
    assert "reports not ready" in line.getMessage()
    late: list[ThreadFailure] = []
    sup.on_fatal(late.append)  # a hook added after the failure hears of it at once
    assert late == [failed]


def test_attack_system_exit_in_a_carry_on_thread_does_not_end_it_unseen() -> None:
    sup = supervisor()

    def exits() -> None:
        raise SystemExit(0)

    sup.run("loop", exits, False, FakeHalt(rounds=99))
    assert sup.failed is not None
    assert sup.failed.kind == "loop"


def test_contained_failures_are_all_counted_but_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    sup = supervisor(log_every_s=3600.0)
    for i in range(5):
        sup.contained("handler", f"message {i}", KeyError(i))
    sup.contained("model", "a batch of 2 inputs", RecursionError("deep"))
    assert sup.counts() == {"handler": 5, "model": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "the handler thread failed on message 0: KeyError: 0" in lines[0]
    assert "the model thread failed on a batch of 2 inputs: RecursionError: deep" in lines[1]
    assert caplog.records[0].exc_info is not None  # the traceback of what was contained
    # A RecursionError's thousands of frames stay out of the log.
    assert not caplog.records[1].exc_info
    assert sup.failed is None


def test_watched_counts_are_reported_with_the_supervisors_own() -> None:
    sup = supervisor()
    outside = [3]
    sup.watch("mqtt", lambda: outside[0])
    sup.count("mqtt")
    assert sup.counts() == {"mqtt": 4}
    outside[0] = 5
    assert sup.counts() == {"mqtt": 6}


def test_a_failing_hook_does_not_hide_the_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    sup = supervisor()
    heard: list[ThreadFailure] = []

    def broken(failure: ThreadFailure) -> None:
        raise RuntimeError("hook bug")

    sup.on_fatal(broken)
    sup.on_fatal(heard.append)
    failure = sup.fail("writer", OSError("disk"))
    assert heard == [failure]
    assert any("a failure hook raised" in r.getMessage() for r in caplog.records)


def test_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="backoff"):
        supervisor(backoff_initial_s=0.0)
    with pytest.raises(ValueError, match="backoff"):
        supervisor(backoff_initial_s=2.0, backoff_max_s=1.0)
