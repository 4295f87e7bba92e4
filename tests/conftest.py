"""Shared fixtures: a real Mosquitto broker on a free port, unique topic prefixes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fogline._broker import EmbeddedBroker, free_port, mosquitto_binary

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


@dataclass
class Broker:
    """A broker the test can stop, restart and kill."""

    host: str
    port: int
    kind: str  # "mosquitto" or "embedded"
    workdir: Path
    _proc: subprocess.Popen[bytes] | None = None
    _embedded: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def supports_shared_subscriptions(self) -> bool:
        return self.kind == "mosquitto"

    def start(self) -> None:
        if self.kind == "embedded":
            self._embedded = EmbeddedBroker(self.host, self.port).start()
            return
        conf_text = MOSQUITTO_CONF.read_text()
        conf_text = re.sub(
            r"(?m)^listener 1883 127.0.0.1$", f"listener {self.port} {self.host}", conf_text
        )
        conf_text = re.sub(
            r"(?m)^persistence_location .*$", f"persistence_location {self.workdir}/", conf_text
        )
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(conf_text)
        binary = mosquitto_binary()
        assert binary is not None
        log = (self.workdir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        else:
            self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_broker(tmp_path: Path) -> Broker:
    kind = "mosquitto" if mosquitto_binary() else "embedded"
    if kind == "embedded" and os.environ.get("FOGLINE_REQUIRE_MOSQUITTO"):
        pytest.fail("FOGLINE_REQUIRE_MOSQUITTO is set but the mosquitto binary is missing")
    broker = Broker(host="127.0.0.1", port=free_port(), kind=kind, workdir=tmp_path)
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh real Mosquitto (embedded amqtt only where Mosquitto is not installed)."""
    b = start_broker(tmp_path)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for a whole test module."""
    b = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"fogline-test/{uuid.uuid4().hex[:12]}"


def make_tiny_bundle(
    root: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    side: int = 8,
    features: int = 16,
    classes: int = 4,
    seed: int = 0,
    relevance: float = 0.5,
    exit_confidence: float = 0.9,
) -> Path:
    """Write a small but real bundle: an edge ONNX model (uint8 frame → relevance, features,
    exit probabilities) and a cloud ONNX model (features → probs), with a verified manifest."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fogline.sync import write_manifest

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pixels = side * side
    w1 = (rng.standard_normal((pixels, features)) / (pixels * 64)).astype(np.float32)
    wr = rng.standard_normal((features, 1)).astype(np.float32)
    we = rng.standard_normal((features, classes)).astype(np.float32)
    wc = rng.standard_normal((features, classes)).astype(np.float32)

    def init(arr: np.ndarray, n: str) -> onnx.TensorProto:
        return numpy_helper.from_array(arr, n)

    edge_graph = helper.make_graph(
        [
            helper.make_node("Cast", ["frame"], ["frame_f"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["frame_f"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w1"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["features"]),
            helper.make_node("MatMul", ["features", "wr"], ["rel_logit"]),
            helper.make_node("Sigmoid", ["rel_logit"], ["relevance"]),
            helper.make_node("MatMul", ["features", "we"], ["exit_logits"]),
            helper.make_node("Softmax", ["exit_logits"], ["exit_probs"], axis=1),
        ],
        "edge",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, ["N", 1, side, side])],
        [
            helper.make_tensor_value_info("relevance", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("exit_probs", TensorProto.FLOAT, ["N", classes]),
        ],
        [init(w1, "w1"), init(wr, "wr"), init(we, "we")],
    )
    cloud_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "wc"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "cloud",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        [init(wc, "wc")],
    )
    opset = [helper.make_opsetid("", 17)]
    for graph, fname in ((edge_graph, "edge.onnx"), (cloud_graph, "cloud.onnx")):
        model = helper.make_model(graph, opset_imports=opset)
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(root / fname))
    write_manifest(
        root,
        {
            "name": name,
            "version": version,
            "files": {"edge.onnx": {}, "cloud.onnx": {}},
            "edge": {
                "model": "edge.onnx",
                "input": "frame",
                "filter_output": "relevance",
                "exit_output": "exit_probs",
                "feature_outputs": ["features"],
            },
            "cloud": {"model": "cloud.onnx", "output": "probs"},
            "thresholds": {"relevance": relevance, "exit_confidence": exit_confidence},
            "codec": {"kind": "int8", "zstd_level": 3},
            "labels": [str(i) for i in range(classes)],
        },
    )
    return root


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """Directory of a small real bundle (8×8 uint8 frames, 16 features, 4 classes)."""
    return make_tiny_bundle(tmp_path / "bundle")


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Factory for tiny bundles with chosen thresholds: ``make_bundle(relevance=0.0)``."""
    counter = iter(range(1_000_000))

    def make(**kwargs: Any) -> Path:
        return make_tiny_bundle(tmp_path / f"bundle-{next(counter)}", **kwargs)

    return make
