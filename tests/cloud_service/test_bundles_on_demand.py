"""Bundles on demand: the cloud loads, from a local catalogue, each bundle version a message
names or a site runs, serves it with that version's own tail, and unloads the versions no
site runs once idle. Real Mosquitto, a real CloudWorker and onnxruntime, a real sync home
(python-tuf metadata, Ed25519 keys) and a real fleet store (SQLite)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fogline.cloud_service import (
    CatalogueSource,
    CloudWorker,
    director_wanted,
    fleet_wanted,
    union_wanted,
)
from fogline.cloud_service._bundle_loads import DEFAULT_GRACE_S
from fogline.compression import Envelope, decode_envelope, encode_envelope
from fogline.sync import Bundle, FleetStore, Platform, StatusReport, SyncHome
from tests.conftest import make_tiny_bundle

pytestmark = pytest.mark.integration


def _tail(bundle_dir: Path) -> Callable[[Envelope], np.ndarray]:
    """The answer of a bundle's own cloud part for an envelope, as it arrives."""
    session = ort.InferenceSession(
        str(bundle_dir / "cloud.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(env: Envelope) -> np.ndarray:
        wire = decode_envelope(encode_envelope(env)).tensors["features"]
        (probs,) = session.run(["probs"], {"features": wire})
        return np.asarray(probs[0])

    return run


class Home:
    """A sync home with tiny bundles released into its catalogue; their cloud parts differ
    (each version's weights come from its own seed)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = SyncHome.init(tmp / "home")
        self.dirs: dict[str, Path] = {}

    def bundle(self, version: str) -> Path:
        if version not in self.dirs:
            self.dirs[version] = make_tiny_bundle(
                self.tmp / f"tiny-{version}", version=version, seed=int(version)
            )
        return self.dirs[version]

    def release(self, version: str) -> None:
        self.home.publish(
            self.bundle(version),
            name="tiny",
            version=version,
            platform=Platform("1.20"),
            regions=("eu",),
            min_agent_version="0.1",
        )

    @property
    def catalogue(self) -> Path:
        return self.home.repository_dir("catalogue")

    def stored(self, version: str, fname: str) -> Path:
        """The catalogue's stored copy of one file of a release (named by its hash)."""
        (path,) = (self.catalogue / "targets" / "tiny" / version).glob(f"*.{fname}")
        return path


class CountingSource(CatalogueSource):
    """The real catalogue source, counting what it is asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[str] = []

    def fetch(self, bundle_id: str) -> Bundle:
        self.asked.append(bundle_id)
        return super().fetch(bundle_id)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


@pytest.fixture
def worker_for(
    home: Home, cloud_config: Any, tmp_path: Path
) -> Iterator[Callable[..., tuple[CloudWorker, CountingSource]]]:
    """Start a worker serving tiny@1 statically, with the home's catalogue as its source."""
    workers: list[CloudWorker] = []

    def start(**kwargs: Any) -> tuple[CloudWorker, CountingSource]:
        source = CountingSource(home.catalogue, tmp_path / "cache")
        worker = CloudWorker(
            cloud_config(bundles=(home.bundle("1"),)), bundle_source=source, **kwargs
        )
        workers.append(worker)
        worker.start()
        return worker, source

    yield start
    for worker in workers:
        worker.stop()


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _serve(paho: Any, env: Envelope, timeout_s: float = 30.0) -> list[Envelope]:
    """Publish ``env`` and re-send it while it is answered busy (as the agent does); every
    answer it got, the last one not busy."""
    deadline = time.monotonic() + timeout_s
    count = 0
    while True:
        paho.publish(env.site, encode_envelope(env))
        count += 1
        answers = paho.answers_for(env, count)
        if answers[-1].meta["status"] != "busy":
            return answers
        if time.monotonic() > deadline:
            raise TimeoutError(f"{env.bundle} still busy after {count} tries")
        time.sleep(0.05)


def test_a_message_for_a_released_version_not_loaded_is_answered_busy_then_served_by_its_tail(
    home: Home, worker_for: Any, paho_client: Any, make_features: Any
) -> None:
    home.release("2")
    worker, source = worker_for()
    assert worker.bundle_ids == ("tiny@1",)
    env = make_features("site-a", bundle="tiny@2", seed=7)

    answers = _serve(paho_client, env)

    assert answers[0].meta["status"] == "busy"
    assert answers[0].meta["retry_after_ms"] == worker.config.batching.busy_retry_after_ms
    served = answers[-1]
    assert served.meta["status"] == "ok", served.meta
    assert served.bundle == "tiny@2"
    # answered by tiny@2's own cloud part, not by tiny@1's
    np.testing.assert_allclose(served.tensors["probs"], _tail(home.bundle("2"))(env), atol=2e-3)
    assert not np.allclose(served.tensors["probs"], _tail(home.bundle("1"))(env), atol=2e-2)
    assert source.asked == ["tiny@2"]  # one load, however many re-sends
    assert set(worker.bundle_ids) == {"tiny@1", "tiny@2"}
    cached = Bundle.load(worker.repository.bundle("tiny@2").root, part="cloud")  # type: ignore[union-attr]
    assert cached.id == "tiny@2"
    assert worker.ready


def test_two_released_versions_are_served_side_by_side_with_the_static_one(
    home: Home, worker_for: Any, paho_client: Any, make_features: Any
) -> None:
    home.release("2")
    home.release("3")
    worker, _ = worker_for()
    sent = [make_features("site-a", bundle=f"tiny@{v}", seed=i) for i in range(4) for v in "123"]
    for env in sent:
        answers = _serve(paho_client, env)
        assert answers[-1].meta["status"] == "ok", answers[-1].meta
        expected = _tail(home.bundle(env.bundle.split("@")[1]))(env)
        np.testing.assert_allclose(answers[-1].tensors["probs"], expected, atol=2e-3)
    assert worker.bundle_ids == ("tiny@1", "tiny@2", "tiny@3")


@pytest.mark.parametrize(
    ("fname", "damage"),
    [("cloud.onnx", "changed"), ("cloud.onnx", "truncated"), ("manifest.json", "changed")],
)
def test_attack_tampered_cloud_part_is_not_loaded(
    home: Home,
    worker_for: Any,
    paho_client: Any,
    make_features: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fname: str,
    damage: str,
) -> None:
    home.release("2")
    stored = home.stored("2", fname)
    data = bytearray(stored.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    worker, _ = worker_for()
    env = make_features("site-a", bundle="tiny@2")

    with caplog.at_level(logging.ERROR, logger="fogline.cloud"):
        answers = _serve(paho_client, env)

    assert answers[0].meta["status"] == "busy"
    assert answers[-1].meta["status"] == "error"
    assert (
        answers[-1].meta["error"] == "bundle 'tiny@2' could not be loaded; the cloud's log says why"
    )
    refusals = [
        r.getMessage() for r in caplog.records if "cannot load bundle tiny@2" in r.getMessage()
    ]
    assert refusals, caplog.text
    assert stored.relative_to(home.catalogue).as_posix() in refusals[0]  # names the file
    assert "does not match the signed length and SHA-256" in refusals[0]
    # nothing cached, nothing half-written, nothing served; the worker serves on
    assert not (tmp_path / "cache" / "tiny" / "2").exists()
    assert list((tmp_path / "cache").rglob(".partial-*")) == []
    assert worker.bundle_ids == ("tiny@1",)
    assert worker.ready
    good = make_features("site-a", bundle="tiny@1")
    assert _serve(paho_client, good)[-1].meta["status"] == "ok"
    assert worker.repository is not None
    assert worker.repository.ready


def test_a_never_released_version_is_answered_unknown_and_the_answer_is_remembered(
    home: Home, worker_for: Any, paho_client: Any, make_features: Any
) -> None:
    home.release("2")
    worker, source = worker_for()
    env = make_features("site-a", bundle="tiny@9")

    answers = _serve(paho_client, env)
    assert answers[-1].meta == {
        "status": "error",
        "error": "unknown bundle 'tiny@9'",
        "worker": worker.worker_id,
    }
    flood = [make_features("site-a", bundle="tiny@9") for _ in range(40)]
    for other in flood:
        paho_client.publish("site-a", encode_envelope(other))
    for other in flood:
        (answer,) = paho_client.answers_for(other, 1)
        assert answer.meta["error"] == "unknown bundle 'tiny@9'"
    assert source.asked == ["tiny@9"]  # the catalogue was asked once
    assert worker.bundle_ids == ("tiny@1",)
    assert worker.ready


def test_a_version_no_longer_wanted_is_unloaded_after_the_grace_period_and_a_static_one_stays(
    home: Home, worker_for: Any, paho_client: Any, make_features: Any
) -> None:
    home.release("2")
    wanted = {"tiny@2"}
    worker, source = worker_for(wanted=lambda: set(wanted), reconcile_s=3600.0)
    _until(lambda: "tiny@2" in worker.bundle_ids, "the first reconcile did not load tiny@2")
    assert _serve(paho_client, make_features("site-a", bundle="tiny@2"))[-1].meta["status"] == "ok"

    wanted.clear()  # the site moved off tiny@2; no site ever ran the static tiny@1
    assert worker.reconcile_bundles().unload == ()  # within the grace period
    assert worker.bundle_ids == ("tiny@1", "tiny@2")
    later = time.monotonic() + DEFAULT_GRACE_S + 1.0
    plan = worker.reconcile_bundles(now=later)

    assert plan.unload == ("tiny@2",)
    assert worker.bundle_ids == ("tiny@1",)
    cached = source.cache_dir / "tiny" / "2"
    assert not cached.exists()  # the cache holds what is served
    # a late item of tiny@2 brings it back (verified and cached again), answered busy first
    answers = _serve(paho_client, make_features("site-a", bundle="tiny@2"))
    assert answers[0].meta["status"] == "busy"
    assert answers[-1].meta["status"] == "ok"
    assert source.asked == ["tiny@2", "tiny@2"]
    assert (cached / "manifest.json").is_file()


def test_the_reconcile_loads_a_wanted_version_before_any_message_names_it(
    home: Home, worker_for: Any, paho_client: Any, make_features: Any, tmp_path: Path
) -> None:
    home.release("2")
    home.release("3")
    home.home.assign(["site-a"], "tiny", "2")  # the director's word for site-a
    fleet = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.register_sites([("site-b", "eu", "default", {"keyid": "k-b"})], now=1.0)
    fleet.record_reports([StatusReport(site="site-b", nonce="n-1", bundle="tiny@3")], now=2.0)
    try:
        wanted = union_wanted(director_wanted(home.home.path), fleet_wanted(fleet))
        assert wanted() == {"tiny@2", "tiny@3"}
        worker, source = worker_for(wanted=wanted)
        _until(
            lambda: set(worker.bundle_ids) == {"tiny@1", "tiny@2", "tiny@3"},
            "the reconcile did not load the wanted versions",
        )
        assert sorted(source.asked) == ["tiny@2", "tiny@3"]
        for site, version in (("site-a", "2"), ("site-b", "3")):
            env = make_features(site, bundle=f"tiny@{version}")
            answers = _serve(paho_client, env)
            assert [a.meta["status"] for a in answers] == ["ok"]  # warm: never busy
            expected = _tail(home.bundle(version))(env)
            np.testing.assert_allclose(answers[0].tensors["probs"], expected, atol=2e-3)
    finally:
        fleet.close()
