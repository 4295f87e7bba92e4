"""Signed model sync across real processes: ``fogline cloud serve --sync-home`` serves the
repositories, the reports and the rollout tick; a real agent (in this process) enrolled
against the home and registered with ``fogline fleet add`` updates itself to the bundle
``fogline rollout start`` rolled out, and the rollout completes with no one calling tick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from fogline._broker import free_port
from fogline.edge_agent import Agent, AgentConfig, RuntimeConfig
from fogline.edge_agent._config import SyncConfig
from fogline.edge_agent._installed import read_installed
from fogline.messaging import MqttSettings
from tests.cloud_service._sync_stand import enroll_site, make_home, wait_for
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
    home = make_home(tmp_path)
    site = enroll_site(home, tmp_path, "site-a")
    home_arg = ("--home", str(home.path))
    _fogline(
        "fleet", "add", "site-a", "--region", "eu", "--fleet", "f1",
        "--key", str(site.state / "site.json"), *home_arg,
    )  # fmt: skip
    port = free_port()
    conf = tmp_path / "cloud.toml"
    conf.write_text(
        f'bundles = ["{tmp_path / "src-1"}"]\nshare_group = ""\n'
        f'[broker]\ntopic_prefix = "{topic_prefix}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/results.db"\n[http]\nport = {port}\n'
    )
    cloud = [
        FOGLINE, "cloud", "serve", "--config", str(conf), "--broker", broker.url,
        "--sync-home", str(home.path), "--sync-tick-s", "0.2",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
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
            sync=SyncConfig(state_dir=site.state, url=url, poll_s=1.0, report_s=1.0),
        )
        with Agent(config) as agent:
            # The site reports through the cloud before any rollout.
            wait_for(lambda: _fogline("fleet", "ls", "--json", *home_arg)["sites"][0]["last_seen"])
            _fogline(
                "rollout", "start", "tiny:2", "--fleet", "f1", "--waves", "100%",
                "--bake", "0s", *home_arg,
            )  # fmt: skip
            wait_for(lambda: agent.bundle_id == "tiny@2", timeout_s=60)
            status = wait_for(
                lambda: (
                    s
                    if (s := _fogline("rollout", "status", "--json", *home_arg))["state"]
                    == "completed"
                    else None
                ),
                timeout_s=60,
            )
        assert status["bundle"] == "tiny@2"
        installed = read_installed(site.state)
        assert installed.current is not None
        assert installed.current.id == "tiny@2"
        (record,) = _fogline("fleet", "ls", "--json", *home_arg)["sites"]
        assert record["bundle"] == "tiny@2"
        assert record["phase"] == "active"
        # The agent fetched everything from the cloud's routes.
        assert httpx.head(f"{url}/sync/director/metadata/timestamp.json").status_code == 200
