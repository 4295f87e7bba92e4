"""The whole data path across real processes: two edge agents and a cloud worker, each
its own OS process, talking through a real Mosquitto; inputs go in through the agents'
local HTTP API and answers come back from the cloud."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from fogline._broker import free_port

pytestmark = pytest.mark.integration

FOGLINE = str(Path(sys.executable).with_name("fogline"))


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"not ready after 60 s:\n{log.read_text()}")


@contextlib.contextmanager
def _process(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"{args[1]} did not stop within 30 s of SIGTERM")
        assert proc.returncode == 0, f"{args[1]} exited with {proc.returncode}:\n{log.read_text()}"


def _cloud_labels(bundle: Path, frames: np.ndarray) -> np.ndarray:
    edge = ort.InferenceSession(str(bundle / "edge.onnx"))
    cloud = ort.InferenceSession(str(bundle / "cloud.onnx"))
    (features,) = edge.run(["features"], {"frame": frames})
    (probs,) = cloud.run(["probs"], {"features": features})
    return np.asarray(probs.argmax(axis=1))


def test_agents_and_a_worker_in_separate_processes_answer_every_input_through_mosquitto(
    broker: Any, make_bundle: Callable[..., Path], topic_prefix: str, tmp_path: Path
) -> None:
    # Nothing is dropped and nothing exits early: every input crosses the broker twice.
    bundle = make_bundle(relevance=0.0, exit_confidence=1.0)
    share = "e2e" if broker.supports_shared_subscriptions else ""
    cloud_port = free_port()
    cloud_conf = tmp_path / "cloud.toml"
    cloud_conf.write_text(
        f'share_group = "{share}"\nbundles = ["{bundle}"]\nworker_id = "e2e-worker"\n'
        f'[broker]\nurl = "{broker.url}"\ntopic_prefix = "{topic_prefix}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/results.db"\n[http]\nport = {cloud_port}\n'
    )
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8)
    expected = _cloud_labels(bundle, frames)

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _process(
                [FOGLINE, "cloud", "serve", "--config", str(cloud_conf)],
                cloud_port,
                tmp_path / "cloud.log",
            )
        )
        ports = {}
        for site in ("site-a", "site-b"):
            ports[site] = free_port()
            conf = tmp_path / f"{site}.toml"
            conf.write_text(
                f'site = "{site}"\nbundle_dir = "{bundle}"\n'
                f'[broker]\nurl = "{broker.url}"\ntopic_prefix = "{topic_prefix}"\n'
                f"[http]\nport = {ports[site]}\n"
                f'[outbox]\npath = "{tmp_path}/outbox-{site}.db"\n'
            )
            stack.enter_context(
                _process(
                    [FOGLINE, "agent", "run", "--config", str(conf)],
                    ports[site],
                    tmp_path / f"{site}.log",
                )
            )
        answers: list[dict[str, Any]] = []
        for i, frame in enumerate(frames):
            site = "site-a" if i % 2 == 0 else "site-b"
            body = {"b64": base64.b64encode(frame.tobytes()).decode(), "shape": [1, 8, 8]}
            resp = httpx.post(f"http://127.0.0.1:{ports[site]}/v1/infer", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
        for i, answer in enumerate(answers):
            assert answer["source"] == "cloud"
            assert answer["worker"] == "e2e-worker"
            assert answer["label"] == int(expected[i])
        # The worker stored every result, under the site that sent it.
        some = answers[1]
        got = httpx.get(
            f"http://127.0.0.1:{cloud_port}/v1/results/site-b/{some['message_id']}", timeout=10
        )
        assert got.status_code == 200, got.text
        assert got.json()["label"] == some["label"]
    # Leaving the stack sent SIGTERM to every process and checked each exited 0.


def test_a_stopped_agent_process_exits_0_on_sigterm(
    broker: Any, make_bundle: Callable[..., Path], topic_prefix: str, tmp_path: Path
) -> None:
    bundle = make_bundle()
    port = free_port()
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'site = "s"\nbundle_dir = "{bundle}"\n[broker]\nurl = "{broker.url}"\n'
        f'topic_prefix = "{topic_prefix}"\n[http]\nport = {port}\n'
        f'[outbox]\npath = "{tmp_path}/outbox.db"\n'
    )
    log = tmp_path / "agent.log"
    args = [FOGLINE, "agent", "run", "--config", str(conf), "--log-format", "json"]
    with _process(args, port, log) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    # --log-format json: every line the agent logged is one JSON object.
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("agent for site s running bundle") for m in messages), messages
    assert any(m == "agent for site s stopped" for m in messages), messages
