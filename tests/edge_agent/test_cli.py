"""``fogline agent run`` as a real process: config errors, readiness, clean stop on signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fogline._broker import free_port
from tests.edge_agent.conftest import frames

FOGLINE = str(Path(sys.executable).with_name("fogline"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FOGLINE, "agent", "run", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_bad_config_is_one_line_naming_the_key_and_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "a"\n[http]\nhost = "0.0.0.0"\n')
    proc = _run("--config", str(config))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {config}: http.host '0.0.0.0' is not a loopback address")


def test_a_directory_that_is_not_a_bundle_exits_2(tmp_path: Path) -> None:
    proc = _run("--site", "a", "--bundle", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: bundle at")
    assert "Traceback" not in proc.stderr


def test_a_missing_site_is_refused(tmp_path: Path) -> None:
    proc = _run("--broker", "mqtt://127.0.0.1:1")
    assert proc.returncode == 2
    assert "--site" in proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_becomes_ready_answers_and_exits_0_on_a_stop_signal(
    broker, bundle_factory, topic_prefix: str, tmp_path: Path, sig: signal.Signals
) -> None:  # type: ignore[no-untyped-def]
    bundle = bundle_factory(relevance=0.0, exit_confidence=0.0)
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
site = "file-site"
cloud_timeout_ms = 2000
[broker]
host = "127.0.0.1"
port = 1
topic_prefix = "{topic_prefix}"
[runtime]
max_batch = 4
"""
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            FOGLINE,
            "agent",
            "run",
            "--config",
            str(config),
            "--broker",
            broker.url,
            "--site",
            "cli-site",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    ready = True
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert ready, proc.stderr.read() if proc.poll() is not None else "not ready in time"
        info = httpx.get(f"{base}/v1/info", timeout=5).json()
        assert info["site"] == "cli-site"
        assert info["results_topic"] == f"{topic_prefix}/cli-site/results"
        r = httpx.post(f"{base}/v1/infer", json={"data": frames(1)[0].tolist()}, timeout=10)
        assert r.status_code == 200
        assert r.json()["source"] == "edge"

        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
