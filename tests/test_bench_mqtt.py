"""``fogline bench mqtt`` in its quickest form: it runs through a real Mosquitto and says
what it measured for each client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import require_mosquitto


@pytest.mark.integration
def test_bench_mqtt_reports_round_trips_and_a_burst_for_both_clients() -> None:
    require_mosquitto()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fogline",
            "bench",
            "mqtt",
            "--rate",
            "200",
            "--seconds",
            "0.5",
            "--burst",
            "300",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout)
    for kind in ("fogline", "paho-default"):
        rt = result[kind]["round_trip"]
        assert rt["offered"] == 100
        assert rt["answered"] == 100
        assert 0 < rt["latency_ms"]["p50"] <= rt["latency_ms"]["p99"] <= rt["latency_ms"]["max"]
        burst = result[kind]["burst"]
        assert burst["received"] == burst["messages"] == 300
        assert burst["messages_per_s"] > 0


def test_bench_mqtt_refuses_an_unknown_client_kind() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fogline", "bench", "mqtt", "--kinds", "fogline,amqp"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--kinds takes fogline, paho-default" in out.stderr
