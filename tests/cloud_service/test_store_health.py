"""The result store's health is visible: write latency, a stall (a real lock held on the
results table, on SQLite and on PostgreSQL) in metrics and ``/readyz`` until it writes
again, and a damaged SQLite file refused at start with a line naming it and what to do."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from fogline._broker import free_port
from fogline.cloud_service import (
    CloudConfig,
    CloudWorker,
    ConfigError,
    ResultStore,
    StoreConfig,
    StoreCorruptError,
    StoredResult,
    create_app,
)
from fogline.compression import Envelope, encode_envelope

POSTGRES_URL = os.environ.get("FOGLINE_TEST_POSTGRES_URL")
FOGLINE = str(Path(sys.executable).with_name("fogline"))


def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class ServerThread:
    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")  # type: ignore[arg-type]
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert until(lambda: self.server.started)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[CloudWorker], httpx.Client]]:
    servers: list[ServerThread] = []

    def start(worker: CloudWorker) -> httpx.Client:
        servers.append(ServerThread(create_app(worker)))
        return servers[-1].client

    yield start
    for s in servers:
        s.close()


def _stall_then_recover(
    worker: CloudWorker,
    http: httpx.Client,
    paho_client,  # type: ignore[no-untyped-def]
    make_features: Callable[..., Envelope],
    lock: Callable[[], None],
    unlock: Callable[[], None],
) -> None:
    """With the table locked: answers still flow, the store stalls in /readyz and the
    metrics, nothing is acknowledged; once unlocked everything is written and ready."""
    assert until(lambda: http.get("/readyz").status_code == 200)
    lock()
    try:
        envs = [make_features("site-a") for _ in range(3)]
        for env in envs:
            paho_client.publish("site-a", encode_envelope(env))
        for env in envs:  # published before stored: answers do not wait for the store
            assert paho_client.result_for(env)[1].meta["status"] == "ok"
        assert until(lambda: http.get("/readyz").status_code == 503)
        reason = http.get("/readyz").json()["reason"]
        assert reason.startswith("result store stalled: no write completed for ")
        assert reason.endswith(" s while 3 results wait")
        assert worker.metrics.value("fogline_cloud_store_stalled") == 1
        assert worker.metrics.value("fogline_cloud_store_waiting") == 3
        # Nothing lost meanwhile: the messages stay unacknowledged, held by the broker.
        assert worker.metrics.value("fogline_cloud_acks_pending") == 3
    finally:
        unlock()
    assert until(lambda: http.get("/readyz").status_code == 200, 30)
    store = worker.store
    assert store is not None
    # the three may have been split over two transactions: ready again after the first
    assert until(lambda: store.count() == 3)
    assert worker.metrics.value("fogline_cloud_store_stalled") == 0
    assert until(lambda: worker.metrics.value("fogline_cloud_acks_pending") == 0)
    assert worker.metrics.value("fogline_cloud_store_write_seconds_count") >= 1
    assert 'fogline_cloud_store_write_seconds_bucket{le="' in http.get("/metrics").text


@pytest.mark.integration
def test_a_locked_sqlite_results_table_is_a_stall_in_readiness_until_it_writes_again(
    cloud_config, paho_client, make_features, serve, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "stalled.db"
    worker = CloudWorker(cloud_config(store=StoreConfig(f"sqlite:///{db}", stall_after_s=0.3)))
    worker.start()
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        _stall_then_recover(
            worker,
            serve(worker),
            paho_client,
            make_features,
            lock=lambda: locker.execute("BEGIN EXCLUSIVE"),  # another writer holds the file
            unlock=lambda: locker.execute("ROLLBACK"),
        )
    finally:
        locker.close()
        worker.stop()


@pytest.mark.integration
def test_a_locked_postgresql_results_table_is_a_stall_in_readiness_until_it_writes_again(
    cloud_config, paho_client, make_features, serve
) -> None:  # type: ignore[no-untyped-def]
    if not POSTGRES_URL:
        pytest.skip("FOGLINE_TEST_POSTGRES_URL is not set")
    table = f"fogline_results_stall_{uuid.uuid4().hex[:12]}"
    store = ResultStore(POSTGRES_URL, table_name=table)
    locker = sa.create_engine(POSTGRES_URL)
    conn = locker.connect()
    worker = CloudWorker(
        cloud_config(store=StoreConfig(POSTGRES_URL, stall_after_s=0.3)), store=store
    )
    worker.start()
    held: list[sa.RootTransaction] = []

    def lock() -> None:
        held.append(conn.begin())
        conn.exec_driver_sql(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')

    try:
        _stall_then_recover(
            worker,
            serve(worker),
            paho_client,
            make_features,
            lock=lock,
            unlock=lambda: held[0].rollback(),  # noqa: PLW0108 - held[0] exists only then
        )
        # The field case: blocked, not refused, so no store error was ever counted.
        assert worker.metrics.value("fogline_cloud_store_errors_total") == 0
    finally:
        worker.stop()
        conn.close()
        locker.dispose()
        store.table.drop(store.engine, checkfirst=True)
        store.close()


def test_the_stall_threshold_is_read_from_the_config_and_checked() -> None:
    assert StoreConfig().stall_after_s == 10.0
    cfg = CloudConfig.from_mapping({"store": {"url": "sqlite://", "stall_after_s": 2}})
    assert cfg.store.stall_after_s == 2.0
    # --store replaces the URL only.
    assert cfg.with_overrides(store_url="sqlite:///x.db").store.stall_after_s == 2.0
    with pytest.raises(ConfigError, match=r"store\.stall_after_s must lie in"):
        CloudConfig.from_mapping({"store": {"stall_after_s": 0}})


# a damaged file


def _results(n: int) -> list[StoredResult]:
    row = ("tiny@1", 1, 0.5, (0.1, 0.2, 0.3, 0.4), "w", 1, 2, 3)
    return [StoredResult("site-a", uuid.uuid4().hex, *row) for _ in range(n)]


def _damaged_store(path: Path) -> Path:
    """A real results file with one b-tree page overwritten (as a torn write or a bad
    sector leaves it)."""
    store = ResultStore(f"sqlite:///{path}")
    store.put_many(_results(400))
    store.close()  # the last connection checkpoints the WAL into the file
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) // page_size > 4
    data[2 * page_size : 3 * page_size] = b"\x5a" * page_size  # page 3
    path.write_bytes(bytes(data))
    return path


def test_attack_a_damaged_sqlite_results_file_is_refused_at_open_naming_it(
    tmp_path: Path,
) -> None:
    db = _damaged_store(tmp_path / "results.db")
    with pytest.raises(StoreCorruptError) as err:
        ResultStore(f"sqlite:///{db}")
    message = str(err.value)
    assert message.startswith(f"the result store {db} is damaged (PRAGMA quick_check: Page 3")
    assert "restore" in message
    assert "move it aside" in message
    assert "\n" not in message


def test_a_sound_sqlite_results_file_passes_the_check_and_keeps_its_results(
    tmp_path: Path,
) -> None:
    db = tmp_path / "results.db"
    first = ResultStore(f"sqlite:///{db}")
    first.put_many(_results(50))
    first.close()
    again = ResultStore(f"sqlite:///{db}")
    assert again.count() == 50
    again.close()


def test_attack_cloud_serve_on_a_damaged_results_file_exits_with_one_error_line(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    db = _damaged_store(tmp_path / "results.db")
    proc = subprocess.run(
        [
            FOGLINE,
            "cloud",
            "serve",
            "--bundle",
            str(tiny_bundle),
            "--store",
            f"sqlite:///{db}",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=30,  # it refuses before any model is loaded or broker reached
        check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the result store {db} is damaged (PRAGMA quick_check: ")
    assert "restore" in last
    assert "Traceback" not in proc.stderr
