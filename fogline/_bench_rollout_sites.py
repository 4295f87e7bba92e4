"""``fogline bench rollout`` with real sites: agents that download, verify and swap bundles.

One cloud (``fogline cloud serve --sync-home``: the MQTT data plane serving
``reference@1`` from the start and loading ``reference@2``'s cloud part from the catalogue
once sites are told to run it, the signed repositories over HTTP, the nonce and report
endpoints, the rollout tick and the MQTT nudges) and a private Mosquitto on loopback. The
rollout is started the way ``fogline rollout start`` starts it (the fleet store and the
director, no broker); the cloud nudges and steps it from there. The sites are real
:class:`~fogline.edge_agent.Agent` objects with a ``[sync]`` config, ``per_process`` of
them in each of a few child processes (``python -m fogline._bench_rollout_sites SPEC``),
each enrolled under the home's roots with its own key, registered in the fleet store and
fed one input at a time at a steady rate throughout.

Every site first installs ``reference@1`` through sync; then ``reference@2`` (the same
edge part, a retrained cloud part) is rolled out in three waves (10 %, 50 %, 100 %) with a
short bake, judged by the health gate on the sites' signed reports. Measured: how long
until every site reports ``reference@2`` active, the bytes a full download would take
against those transferred (the edge part did not change: manifests only), the sites'
verification failures, and ``swap_dropped``: inputs submitted during the rollout whose
answer failed or never came.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

__all__ = ["run_sites_bench"]

NAME = "reference"
_WAVES = (0.1, 0.5, 1.0)
_REPORT_S = 2.0
# Every simulated site shares this host's cores: one site's swap (TUF refresh, load, warm
# up) slows the others' inputs, which a real fleet's sites, each on its own CPU, do not
# see. The gate judges latency with room for that (2× the baseline + 20 ms); error and
# agreement rates as by default.
_TOLERANCE_RATIO = 2.0
_TOLERANCE_MS = 20.0
_POLL_S = 30.0


# ----------------------------------------------------------------------------- child


def _child(spec_path: Path) -> int:
    """One process of sites: start every agent, feed inputs until ``stop`` appears, then
    wait for what is outstanding and write ``stats-<n>.json``."""
    from fogline.edge_agent import Agent, AgentConfig, OutboxConfig, RuntimeConfig
    from fogline.edge_agent._config import SyncConfig
    from fogline.messaging import MqttSettings
    from fogline.reference._frames import make_frames

    spec = json.loads(spec_path.read_text())
    work = spec_path.parent
    index = int(spec["index"])
    frames, _ = make_frames(64, seed=11 + index, split="holdout")
    agents: list[Agent] = []
    for site in spec["sites"]:
        state = Path(site["state_dir"])
        agents.append(
            Agent(
                AgentConfig(
                    site=site["site"],
                    bundle_dir=Path(spec["bundle_dir"]),
                    broker=MqttSettings.from_url(spec["broker"], topic_prefix=spec["prefix"]),
                    runtime=RuntimeConfig(threads=1, max_batch=8, warmup_runs=1),
                    cloud_timeout_ms=15_000,
                    outbox=OutboxConfig(path=state / "outbox.db"),
                    sync=SyncConfig(
                        state_dir=state, url=spec["cloud"], poll_s=_POLL_S, report_s=_REPORT_S
                    ),
                )
            )
        )
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    pending: set[Future[Any]] = set()
    window = {"open": False}

    def done(fut: Future[Any], *, measured: bool) -> None:
        with lock:
            pending.discard(fut)
            key = "measured" if measured else "setup"
            try:
                answer = fut.result()
            except Exception:  # noqa: BLE001 - a failed input is what is counted here
                counts[f"{key}_failed"] += 1
                return
            counts[f"{key}_{answer.status}"] += 1
            counts[f"bundle_{answer.bundle}"] += 1

    def write_stats(final: bool) -> None:
        with lock:
            data: dict[str, Any] = dict(counts)
            data["outstanding"] = len(pending)
        data["final"] = final
        data["running"] = {a.config.site: a.bundle_id for a in agents}
        sync: Counter[str] = Counter()
        for agent in agents:
            updater = agent.updater
            if updater is not None:
                sync.update(updater.counters())
        data["sync"] = dict(sync)
        tmp = work / f".stats-{index}.json"
        tmp.write_text(json.dumps(data))
        tmp.replace(work / f"stats-{index}.json")

    stop = work / "stop"
    measure = work / "measure"
    with contextlib.ExitStack() as stack:
        for agent in agents:
            stack.enter_context(agent)
        period = 1.0 / float(spec["rate_per_site"])
        next_at = time.monotonic()
        k = 0
        last_stats = 0.0
        while not stop.exists():
            if not window["open"] and measure.exists():
                window["open"] = True
            measured = window["open"]
            for agent in agents:
                frame = frames[k % len(frames)]
                k += 1
                try:
                    fut = agent.submit(frame)
                except Exception:  # noqa: BLE001 - refused at once: counted as failed
                    with lock:
                        counts["measured_failed" if measured else "setup_failed"] += 1
                    continue
                with lock:
                    counts["measured_submitted" if measured else "setup_submitted"] += 1
                    pending.add(fut)
                fut.add_done_callback(functools.partial(done, measured=measured))
            now = time.monotonic()
            if now - last_stats >= 0.5:
                write_stats(final=False)
                last_stats = now
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    break
            time.sleep(0.1)
        write_stats(final=True)
    return 0


# ---------------------------------------------------------------------------- parent


def _v2_bundle(source: Path, out: Path) -> Path:
    """``source`` as version 2: the same edge part, the cloud part's weights retrained
    (scaled by 1.001: the same decisions, other bytes)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from fogline.sync import write_manifest

    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    cloud_file = out / manifest["cloud"]["model"]
    model = onnx.load(str(cloud_file))
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            scaled = numpy_helper.from_array((array * np.float32(1.001)), tensor.name)
            model.graph.initializer[i].CopyFrom(scaled)
    onnx.save(model, str(cloud_file))
    manifest["version"] = "2"
    write_manifest(out, manifest)
    return out


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud exited with {proc.returncode} before it was ready")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/readyz", timeout=1) as response,  # noqa: S310
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the cloud did not become ready in time")


def _stats(work: Path, processes: int) -> list[dict[str, Any]]:
    out = []
    for i in range(processes):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads((work / f"stats-{i}.json").read_text()))
    return out


@contextlib.contextmanager
def _processes(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def run_sites_bench(
    sites: int,
    tmp: Path,
    *,
    per_process: int = 50,
    rate_per_site: float = 1.0,
    bake_s: float = 6.0,
    timeout_s: float = 300.0,
    progress: Any = None,
) -> dict[str, Any]:
    """The real-site rollout bench (see the module docstring); its figures."""
    import onnxruntime

    from fogline._broker import MosquittoProcess, free_port
    from fogline.reference import BUNDLE_DIR
    from fogline.sync import Platform, SiteIdentity, SyncHome, enroll
    from fogline.sync._fleet import FleetStore
    from fogline.sync._rollout import RolloutPolicy, Tolerance
    from fogline.sync._rollout_service import RolloutService

    say = progress or (lambda _msg: None)
    tolerance = Tolerance(latency_ratio=_TOLERANCE_RATIO, latency_ms=_TOLERANCE_MS)
    home = SyncHome.init(tmp / "home")
    v1 = tmp / "bundle-1"
    shutil.copytree(BUNDLE_DIR, v1)
    v2 = _v2_bundle(BUNDLE_DIR, tmp / "bundle-2")
    platform = Platform(str(onnxruntime.__version__))
    for version, path in (("1", v1), ("2", v2)):
        home.publish(
            path,
            name=NAME,
            version=version,
            platform=platform,
            regions=("eu",),
            min_agent_version="0.0",
        )
    fleet_name = "bench"
    names = [f"site-{i:04d}" for i in range(sites)]
    say(f"enrolling {sites} sites")
    states = {}
    keys: list[tuple[str, str, str, Any]] = []
    for name in names:
        state = tmp / "sites" / name
        enroll(state, home.root_file("catalogue"), home.root_file("director"), name, "eu")
        states[name] = state
        keys.append((name, "eu", fleet_name, SiteIdentity.load(state).public_key))
    store_url = f"sqlite:///{home.path / 'fleet.db'}"
    store = FleetStore(store_url)
    RolloutService(store, home).register_sites(keys)
    home.assign(names, NAME, "1")

    prefix = f"fogline-bench-rollout/{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    with MosquittoProcess() as broker, _processes(procs):
        port = free_port()
        cloud_url = f"http://127.0.0.1:{port}"
        conf = tmp / "cloud.toml"
        conf.write_text(
            "\n".join(
                [
                    "[broker]",
                    f'url = "{broker.url}"',
                    f'topic_prefix = "{prefix}"',
                    "[store]",
                    f'url = "sqlite:///{tmp / "results.db"}"',
                    "[http]",
                    f"port = {port}",
                ]
            )
            + "\n"
        )
        log = (tmp / "cloud.log").open("wb")
        say("starting the cloud")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fogline",
                    "cloud",
                    "serve",
                    "--config",
                    str(conf),
                    # reference@1 served from the start (the packaged bundle); reference@2
                    # loaded from the catalogue once sites are told to run it
                    "--sync-home",
                    str(home.path),
                    "--sync-store",
                    store_url,
                    "--sync-tick-s",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait_http(cloud_url, procs[0], 90.0)

        work = tmp / "work"
        work.mkdir()
        groups = [names[i : i + per_process] for i in range(0, sites, per_process)]
        say(f"starting {sites} sites in {len(groups)} processes")
        for i, group in enumerate(groups):
            spec = work / f"spec-{i}.json"
            spec.write_text(
                json.dumps(
                    {
                        "index": i,
                        "sites": [{"site": s, "state_dir": str(states[s])} for s in group],
                        "bundle_dir": str(v1),
                        "broker": broker.url,
                        "prefix": prefix,
                        "cloud": cloud_url,
                        "rate_per_site": rate_per_site,
                    }
                )
            )
            child_log = (tmp / f"sites-{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fogline._bench_rollout_sites", str(spec)],
                    stdout=child_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def on(bundle: str) -> int:
            return sum(1 for s in store.sites(fleet_name) if s.bundle == bundle)

        def wait(what: str, ok: Any, limit_s: float) -> None:
            deadline = time.monotonic() + limit_s
            while not ok():
                for proc in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"a bench process exited with {proc.returncode} while waiting "
                            f"for {what} (logs in {tmp})"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: not reached in {limit_s:.0f} s")
                time.sleep(0.5)

        say("waiting for every site to run reference@1")
        wait(f"{sites} sites active on {NAME}@1", lambda: on(f"{NAME}@1") == sites, timeout_s)
        time.sleep(2 * _REPORT_S)  # a baseline of health reports on the old bundle
        (work / "measure").touch()
        time.sleep(1.0)
        say("rolling out reference@2 in three waves")
        # Started here as `fogline rollout start` starts it (the store and the director,
        # no broker): the cloud nudges the first wave at its next tick, then steps it.
        service = RolloutService(store, home)
        policy = RolloutPolicy(
            canary=0.0,
            waves=_WAVES,
            bake_s=bake_s,
            site_timeout_s=120.0,
            auto_rollback=True,
            tolerance=tolerance,
        )
        t0 = time.monotonic()
        started = service.start(f"{NAME}@2", fleet_name, policy)
        rollout_id = started["id"]

        def ended() -> bool:
            return service.status(rollout_id).get("state") in ("rolled_back", "aborted")

        def converged() -> bool:
            return ended() or (
                on(f"{NAME}@2") == sites
                and all(s.phase == "active" for s in store.sites(fleet_name))
            )

        wait(f"{sites} sites active on {NAME}@2", converged, timeout_s)
        seconds = time.monotonic() - t0
        # the last wave still bakes: the rollout completes once it has stayed healthy
        wait(
            f"rollout {rollout_id} completed",
            lambda: service.status(rollout_id).get("state") not in ("running", "paused"),
            timeout_s,
        )
        completed_s = time.monotonic() - t0
        final = service.status(rollout_id)
        time.sleep(1.0)  # inputs keep flowing after the last swap
        (work / "stop").touch()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            stats = _stats(work, len(groups))
            if len(stats) == len(groups) and all(s.get("final") for s in stats):
                break
            time.sleep(0.5)
        stats = _stats(work, len(groups))
        store_sites = store.sites(fleet_name)
        store.close()

    total: Counter[str] = Counter()
    sync: Counter[str] = Counter()
    for s in stats:
        for key, value in s.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] += value
        sync.update(s.get("sync", {}))
    submitted = total["measured_submitted"]
    answered_ok = total["measured_ok"] + total["measured_degraded"]
    return {
        "sites": sites,
        "processes": len(groups),
        "waves": len(_WAVES),
        "rollout_state": final.get("state"),
        "reason": final.get("reason"),
        "converged": sum(1 for s in store_sites if s.bundle == f"{NAME}@2"),
        "seconds_to_converge": round(seconds, 2),
        "seconds_to_complete": round(completed_s, 2),
        "bytes_full": sync["bytes_full_update"],
        "bytes_transferred": sync["bytes_transferred_update"],
        "bytes_first_install": sync["bytes_transferred_first"],
        "verify_failures": sync["verify_failures"],
        "inputs_during_rollout": submitted,
        "answered_ok": total["measured_ok"],
        "answered_degraded": total["measured_degraded"],
        "swap_dropped": submitted - answered_ok,
        "unanswered": total["outstanding"],
        "gate": {
            "baseline": final.get("baseline"),
            "waves": [w.get("health") for w in final.get("wave_table", [])],
        },
        "rate_per_site": rate_per_site,
        "bake_s": bake_s,
    }


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
