"""``fogline cloud serve`` as a real process: config errors, readiness, SIGTERM."""

from __future__ import annotations

import json
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


def _wait_http(url: str, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer 200 in time")


@pytest.mark.integration
def test_serve_with_a_model_repository_answers_the_inference_protocol_behind_tokens(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fogline.reference._mlp import write_reference_mlp

    repo = tmp_path / "models"
    write_reference_mlp(repo, name="mlp")
    tokens = tmp_path / "tokens.toml"
    made = subprocess.run(
        [
            FOGLINE,
            "cloud",
            "token",
            "create",
            "--name",
            "app",
            "--scope",
            "infer",
            "--scope",
            "read",
            "--file",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    secret = made.stdout.strip().splitlines()[-1].split()[-1]
    ops = subprocess.run(
        [
            FOGLINE,
            "cloud",
            "token",
            "create",
            "--name",
            "ops",
            "--scope",
            "admin",
            "--file",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    admin_secret = ops.stdout.strip().splitlines()[-1].split()[-1]
    assert secret not in tokens.read_text()
    assert tokens.stat().st_mode & 0o777 == 0o600
    port = free_port()
    proc = subprocess.Popen(
        [
            FOGLINE,
            "cloud",
            "serve",
            "--model-repository",
            str(repo),
            "--bundle",
            str(tiny_bundle),
            "--tokens",
            str(tokens),
            "--port",
            str(port),
            "--store",
            "sqlite://",
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/v2/health/ready", proc)
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 256], "data": [0.5] * 256}
            ]
        }
        assert httpx.post(f"{base}/v2/models/mlp/infer", json=body).status_code == 401
        auth = {"Authorization": f"Bearer {secret}"}
        r = httpx.post(f"{base}/v2/models/mlp/infer", json=body, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [1, 10]
        # The bundle's cloud part is served too, by its bundle name.
        assert httpx.get(f"{base}/v2/models/tiny", headers=auth).json()["versions"] == ["1"]
        assert httpx.get(f"{base}/metrics").status_code == 401
        text = httpx.get(f"{base}/metrics", headers=auth).text
        assert 'fogline_model_requests_total{lane="interactive",model="mlp"' in text
        assert httpx.get(f"{base}/readyz").status_code == 200
        # Loading and unloading at run time takes the admin scope.
        unload = f"{base}/v2/repository/models/mlp/unload"
        assert httpx.post(unload, headers=auth).status_code == 403
        admin = {"Authorization": f"Bearer {admin_secret}"}
        assert httpx.post(unload, headers=admin).status_code == 200
        assert httpx.post(f"{base}/v2/models/mlp/infer", json=body, headers=auth).status_code == 503
        ok = httpx.get(f"{base}/v2/models/tiny/ready", headers=auth)
        assert ok.status_code == 200  # the other model is undisturbed
        index = httpx.post(f"{base}/v2/repository/index", headers=auth).json()
        assert {(r["name"], r["state"]) for r in index} >= {
            ("mlp", "UNAVAILABLE"),
            ("tiny", "READY"),
        }
        load = f"{base}/v2/repository/models/mlp/load"
        assert httpx.post(load, headers=admin, timeout=60).status_code == 200
        assert httpx.post(f"{base}/v2/models/mlp/infer", json=body, headers=auth).status_code == 200
        missing = httpx.post(f"{base}/v2/repository/models/nope/load", headers=admin)
        assert missing.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # --log-format json: every log line is one JSON object.
    assert proc.stderr is not None
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any(r["message"] == "model mlp version 1 is ready" for r in records)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
