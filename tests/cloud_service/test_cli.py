"""``fogline cloud serve`` as a real process: config errors, readiness, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fogline._broker import free_port

FOGLINE = str(Path(sys.executable).with_name("fogline"))


def test_a_bad_config_is_one_line_on_stderr_and_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text("[batching]\nmax_batch_size = 0\n")
    proc = subprocess.run(
        [FOGLINE, "cloud", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {config}: batching.max_batch_size must be at least 1, got 0"
    ]


def test_a_directory_that_is_not_a_bundle_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [FOGLINE, "cloud", "serve", "--bundle", str(tmp_path), "--store", "sqlite://"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: bundle {tmp_path}")
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_becomes_ready_and_exits_0_on_a_stop_signal(
    broker, tiny_bundle: Path, topic_prefix: str, tmp_path: Path, sig: signal.Signals
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = tmp_path / "cloud.toml"
    config.write_text(
        f"""
share_group = "{"fogline-cloud" if broker.supports_shared_subscriptions else ""}"
bundles = ["{tiny_bundle}"]
worker_id = "cli-test"

[broker]
url = "{broker.url}"
topic_prefix = "{topic_prefix}"

[store]
url = "sqlite:///{tmp_path / "results.db"}"

[http]
port = {port}
"""
    )
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [FOGLINE, "cloud", "serve", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{url}/readyz", timeout=1).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, (tmp_path / "serve.log").read_text()
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["worker"] == "cli-test"
        assert ready["bundles"] == ["tiny@1"]
        proc.send_signal(sig)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
