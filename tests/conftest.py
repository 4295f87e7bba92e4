"""Shared fixtures: a real Mosquitto broker on a free port, unique topic prefixes."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fogline._broker import EmbeddedBroker, free_port, mosquitto_binary
from fogline._mqtt import MqttConnection

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_DIR = REPO / "deploy" / "mosquitto"
# The one-box configuration (anonymous, loopback): what every `broker` fixture runs.
MOSQUITTO_CONF = MOSQUITTO_DIR / "mosquitto.local.conf"
# The production configuration (passwords, per-site ACLs, TLS): tests/test_broker_config.py.
MOSQUITTO_PRODUCTION_CONF = MOSQUITTO_DIR / "mosquitto.conf"


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


_LISTENER_RE = re.compile(r"^listener\s+(\d+)(?:\s+(\S+))?\s*$")
_OPTION_RE = re.compile(r"^(#?)([a-z_]+)\s+\S")


def render_mosquitto_conf(
    text: str,
    *,
    host: str,
    ports: Mapping[int, int],
    options: Mapping[str, str],
) -> str:
    """A shipped Mosquitto config with only what differs between machines replaced.

    Every ``listener <port> [address]`` line whose port is a key of ``ports`` is bound to
    ``host`` and the mapped port; every option named in ``options`` (paths, the run-as user)
    gets the given value; a commented-out option (``#name value``) named there is enabled.
    Anything to replace that the file lacks raises ``ValueError``, so the tests notice when
    the shipped file changes under them. Everything else is used as shipped.
    """
    lines = text.splitlines()
    active = {m.group(2) for m in map(_OPTION_RE.match, lines) if m and not m.group(1)}
    seen_ports: set[int] = set()
    seen_options: set[str] = set()
    out: list[str] = []
    for line in lines:
        listener = _LISTENER_RE.match(line)
        option = _OPTION_RE.match(line)
        if listener and int(listener.group(1)) in ports:
            shipped = int(listener.group(1))
            seen_ports.add(shipped)
            out.append(f"listener {ports[shipped]} {host}")
        elif (
            option
            and (name := option.group(2)) in options
            and name not in seen_options
            and not (option.group(1) and name in active)
        ):
            seen_options.add(name)
            out.append(f"{name} {options[name]}")
        else:
            out.append(line)
    missing = [f"listener {p}" for p in ports if p not in seen_ports]
    missing += [name for name in options if name not in seen_options]
    if missing:
        raise ValueError(f"the Mosquitto config has no {', '.join(missing)} to replace")
    return "\n".join(out) + "\n"


def _run_as_user() -> dict[str, str]:
    # Started as root, Mosquitto switches to the `user` of its config (mosquitto) and then
    # cannot read the test's 0600 password file or write persistence into pytest's 0700
    # temporary directories; keep it as the user running the tests instead.
    if os.geteuid() == 0:
        import pwd

        return {"user": pwd.getpwuid(0).pw_name}
    return {}


@dataclass
class Broker:
    """A broker the test can stop, restart and kill.

    Mosquitto runs from a shipped config, ``conf_source`` (the one-box config unless told
    otherwise), with its ``listener 1883`` on ``port``, further shipped listener ports moved
    as ``extra_ports`` says, and the options in ``options`` (file paths) replaced.
    """

    host: str
    port: int
    kind: str  # "mosquitto" or "embedded"
    workdir: Path
    conf_source: Path = MOSQUITTO_CONF
    extra_ports: dict[int, int] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None
    _embedded: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def supports_shared_subscriptions(self) -> bool:
        return self.kind == "mosquitto"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def port_for(self, shipped_port: int) -> int:
        """The port this broker listens on for the shipped config's ``listener <port>``."""
        return self.port if shipped_port == 1883 else self.extra_ports[shipped_port]

    def render_conf(self) -> str:
        return render_mosquitto_conf(
            self.conf_source.read_text(),
            host=self.host,
            ports={1883: self.port, **self.extra_ports},
            options={
                "persistence_location": f"{self.workdir}/",
                **_run_as_user(),
                **self.options,
            },
        )

    def start(self) -> None:
        if self.kind == "embedded":
            self._embedded = EmbeddedBroker(self.host, self.port).start()
            return
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.render_conf())
        binary = mosquitto_binary()
        assert binary is not None
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        for port in (self.port, *self.extra_ports.values()):
            self._wait_listening(port)

    def _wait_listening(self, port: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:]
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start-up; its log ends:\n{log}")
            try:
                with socket.create_connection((self.host, port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nothing listens on {self.host}:{port} after {timeout_s} s")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files, keeping connections."""
        if self._proc is None:
            raise RuntimeError("only a running Mosquitto process can reload its config")
        self._proc.send_signal(signal.SIGHUP)

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


def require_mosquitto() -> str:
    """The Mosquitto binary; skips the test without it, unless FOGLINE_REQUIRE_MOSQUITTO."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("FOGLINE_REQUIRE_MOSQUITTO"):
            pytest.fail("FOGLINE_REQUIRE_MOSQUITTO is set but the mosquitto binary is missing")
        pytest.skip("mosquitto is not installed")
    return binary


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


def publish_from_threads(
    pub: MqttConnection, topic: str, threads: int, each: int, size: int
) -> list[bytes]:
    """Publish ``threads`` × ``each`` messages of ``size`` bytes, every thread at once."""
    sent: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        start.wait()
        for i in range(each):
            body = hashlib.sha256(f"{t}/{i}".encode()).digest() * (size // 32)
            with lock:
                sent.append(body)
            pub.publish(topic, body)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    return sent
