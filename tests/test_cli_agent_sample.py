"""``fogline agent sample``: a body for the agent's ``POST /v1/infer``, from the reference
frames, that a running agent on the packaged bundle answers."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fogline._broker import free_port
from fogline.cli import app
from fogline.reference._frames import FRAME_SHAPE, NO_DIGIT, make_frames

FOGLINE = str(Path(sys.executable).with_name("fogline"))


def _sample(*args: str) -> tuple[dict[str, Any], str]:
    result = CliRunner().invoke(app, ["agent", "sample", *args])
    assert result.exit_code == 0, result.output
    return (json.loads(result.stdout) if result.stdout else {}), result.stderr


def _pixels(body: dict[str, Any]) -> np.ndarray:
    if "data" in body:
        return np.asarray(body["data"], dtype=np.uint8)
    raw = base64.b64decode(body["b64"], validate=True)
    return np.frombuffer(raw, dtype=body["dtype"]).reshape(body["shape"])


def test_the_body_holds_the_reference_frame_of_its_seed_and_names_its_digit() -> None:
    body, note = _sample("--seed", "5")
    frames, labels = make_frames(1, seed=5, p_digit=1.0, split="holdout")

    assert set(body) == {"b64", "shape", "dtype", "tag"}
    assert (body["shape"], body["dtype"], body["tag"]) == (list(FRAME_SHAPE), "uint8", "sample-5")
    np.testing.assert_array_equal(_pixels(body), frames[0])
    assert labels[0] != NO_DIGIT
    assert note.strip() == f"a frame holding the digit {labels[0]} (seed 5)"


def test_the_same_seed_gives_the_same_frame_and_another_seed_another() -> None:
    first, _ = _sample("--seed", "2")
    again, _ = _sample("--seed", "2")
    other, _ = _sample("--seed", "3")
    assert first == again
    assert first["b64"] != other["b64"]


def test_an_empty_frame_as_nested_lists_goes_to_the_file_named(tmp_path: Path) -> None:
    out = tmp_path / "body.json"
    body, note = _sample("--empty", "--lists", "--seed", "1", "--out", str(out))
    written = json.loads(out.read_text())
    frames, labels = make_frames(1, seed=1, p_digit=0.0, split="holdout")

    assert body == {}  # nothing on stdout
    assert set(written) == {"data", "tag"}
    np.testing.assert_array_equal(_pixels(written), frames[0])
    assert labels[0] == NO_DIGIT
    assert note.strip() == f"wrote {out}: a frame holding no digit (seed 1)"


def test_an_unwritable_out_file_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["agent", "sample", "--out", str(tmp_path / "missing" / "body.json")]
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: cannot write {tmp_path / 'missing' / 'body.json'}: No such file or directory"
    ]


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
def _serving(args: list[str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen([FOGLINE, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port, log)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_running_agent_on_the_reference_bundle_answers_the_sample_bodies(
    broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    agent_port, cloud_port = free_port(), free_port()
    share = "sample" if broker.supports_shared_subscriptions else ""
    (tmp_path / "cloud.toml").write_text(
        f'share_group = "{share}"\n[broker]\nurl = "{broker.url}"\n'
        f'topic_prefix = "{topic_prefix}"\n[store]\nurl = "sqlite:///{tmp_path}/results.db"\n'
        f"[http]\nport = {cloud_port}\n"
    )
    (tmp_path / "agent.toml").write_text(
        f'site = "sample-site"\n[broker]\nurl = "{broker.url}"\n'
        f'topic_prefix = "{topic_prefix}"\n[http]\nport = {agent_port}\n'
        f'[outbox]\npath = "{tmp_path}/outbox.db"\n'
    )
    digit = subprocess.run(
        [FOGLINE, "agent", "sample", "--seed", "0"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    empty = subprocess.run(
        [FOGLINE, "agent", "sample", "--empty", "--lists"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    url = f"http://127.0.0.1:{agent_port}/v1/infer"
    cloud = ["cloud", "serve", "-c", str(tmp_path / "cloud.toml")]
    agent = ["agent", "run", "-c", str(tmp_path / "agent.toml")]
    with (
        _serving(cloud, cloud_port, tmp_path / "cloud.log"),
        _serving(agent, agent_port, tmp_path / "agent.log"),
    ):
        answered = httpx.post(url, content=digit.stdout, timeout=30)
        dropped = httpx.post(url, content=empty.stdout, timeout=30)

    assert answered.status_code == 200, answered.text
    answer = answered.json()
    assert answer["tag"] == "sample-0"
    assert answer["source"] in {"edge", "cloud"}
    assert answer["status"] == "ok"
    assert answer["bundle"] == "reference@1"
    assert 0 <= answer["label"] <= 9
    assert dropped.status_code == 200, dropped.text
    assert (dropped.json()["source"], dropped.json()["label"]) == ("dropped", None)
