"""Signed model sync across real processes: ``fogline cloud serve --sync-home`` serves the
repositories, the reports and the rollout tick; a real agent (in this process) enrolled
against the home and registered with ``fogline fleet add`` updates itself to the bundle
``fogline rollout start`` rolled out, and the rollout completes with no one calling tick."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fogline._broker import free_port
from fogline.edge_agent import Agent, AgentConfig, RuntimeConfig
from fogline.edge_agent._config import SyncConfig
from fogline.edge_agent._installed import read_installed
from fogline.messaging import MqttSettings
from tests.cloud_service._sync_stand import enroll_site, make_home
from tests.edge_agent._sync_fleet import wait_for
from tests.edge_agent.conftest import frames
from tests.test_end_to_end import _process

pytestmark = pytest.mark.integration

FOGLINE = str(Path(sys.executable).with_name("fogline"))


def _fogline(*args: str) -> Any:
    done = subprocess.run(
        [FOGLINE, *args], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"fogline {' '.join(args)}: {done.stdout}{done.stderr}"
    return json.loads(done.stdout) if "--json" in args else done.stdout


def test_an_agent_follows_a_rollout_served_by_fogline_cloud_serve(
    broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    with _served_site(broker, topic_prefix, tmp_path) as (agent, home_arg, url):
        _fogline(
            "rollout", "start", "tiny:2", "--fleet", "f1", "--waves", "100%",
            "--bake", "0s", *home_arg,
        )  # fmt: skip
        wait_for(lambda: agent.bundle_id == "tiny@2", timeout_s=60)
        status = wait_for(
            lambda: (
                s
                if (s := _fogline("rollout", "status", "--json", *home_arg))["state"] == "completed"
                else None
            ),
            timeout_s=60,
        )
        assert status["bundle"] == "tiny@2"
        installed = read_installed(agent.config.sync.state_dir)  # type: ignore[union-attr]
        assert installed.current is not None
        assert installed.current.id == "tiny@2"
        (record,) = _fogline("fleet", "ls", "--json", *home_arg)["sites"]
        assert record["bundle"] == "tiny@2"
        assert record["phase"] == "active"
        # The agent fetched everything from the cloud's routes.
        assert httpx.head(f"{url}/sync/director/metadata/timestamp.json").status_code == 200


@contextlib.contextmanager
def _served_site(
    broker: Any, topic_prefix: str, tmp_path: Path
) -> Iterator[tuple[Agent, tuple[str, str], str]]:
    """A home, ``fogline cloud serve --sync-home`` on it, and a running agent of site-a
    (fleet f1) on tiny@1 that polls and reports every second, reported through the cloud
    before any rollout; the agent, the ``--home`` option, the cloud's URL."""
    home = make_home(tmp_path)
    site = enroll_site(home, tmp_path, "site-a")
    home_arg = ("--home", str(home.path))
    _fogline(
        "fleet", "add", "site-a", "--region", "eu", "--fleet", "f1",
        "--key", str(site.state / "site.json"), *home_arg,
    )  # fmt: skip
    home.assign(["site-a"], "tiny", "1")
    port = free_port()
    conf = tmp_path / "cloud.toml"
    conf.write_text(
        f'share_group = ""\n[broker]\ntopic_prefix = "{topic_prefix}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/results.db"\n[http]\nport = {port}\n'
    )
    cloud = [
        FOGLINE, "cloud", "serve", "--config", str(conf), "--broker", broker.url,
        "--sync-home", str(home.path), "--sync-tick-s", "0.2",
    ]  # fmt: skip
    with _process(cloud, port, tmp_path / "cloud.log"):
        config = AgentConfig(
            site="site-a",
            bundle_dir=tmp_path / "src-1",
            broker=MqttSettings(
                host=broker.host,
                port=broker.port,
                topic_prefix=topic_prefix,
                reconnect_min_s=1,
                reconnect_max_s=1,
                connect_timeout_s=10,
            ),
            runtime=RuntimeConfig(max_batch=8, warmup_runs=1),
            sync=SyncConfig(
                state_dir=site.state, url=f"http://127.0.0.1:{port}", poll_s=1.0, report_s=1.0
            ),
        )
        with Agent(config) as agent:
            wait_for(lambda: _fogline("fleet", "ls", "--json", *home_arg)["sites"][0]["bundle"])
            yield agent, home_arg, f"http://127.0.0.1:{port}"


def test_a_rolled_back_agent_serves_its_previous_bundle_and_stays_active(
    broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    """A rollout to tiny@2 rolled back from the command line mid-bake: the agent swaps back
    to tiny@1 (below its release floor, the bundle it ran before) and, refresh after
    refresh, reports it active — a rolled-back site is not a failed one. The cloud serves
    tiny@2's cloud part on demand, never given it at start."""
    with _served_site(broker, topic_prefix, tmp_path) as (agent, home_arg, _url):
        wait_for(lambda: agent.bundle_id == "tiny@1", timeout_s=60)
        _fogline(
            "rollout", "start", "tiny:2", "--fleet", "f1", "--canary", "0%",
            "--waves", "100%", "--bake", "10m", *home_arg,
        )  # fmt: skip
        wait_for(lambda: agent.bundle_id == "tiny@2", timeout_s=60)
        answer = agent.submit(frames(1, seed=1)[0]).result(timeout=30)
        assert answer.bundle == "tiny@2"
        _fogline("rollout", "rollback", *home_arg)
        wait_for(lambda: agent.bundle_id == "tiny@1", timeout_s=60)
        time.sleep(3.5)  # three more refreshes and reports on the rolled-back bundle
        (record,) = _fogline("fleet", "ls", "--json", *home_arg)["sites"]
        assert record["bundle"] == "tiny@1"
        assert record["phase"] == "active", record
        assert record["error"] is None
        status = _fogline("rollout", "status", "--json", *home_arg)
        assert status["state"] == "rolled_back"
