"""A command run without its extra names the extra to install in one line."""

from __future__ import annotations

import sys

import pytest

from fogline import cli


def test_bench_without_httpx_names_the_demo_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom() -> None:
        raise ModuleNotFoundError("No module named 'httpx'", name="httpx")

    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr(sys, "argv", ["fogline", "bench", "e2e"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: fogline bench e2e needs the 'demo' extra (missing module httpx): "
        "pip install 'fogline[demo]'"
    ]


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["agent", "run"], "paho.mqtt.client", "edge"),
        (["cloud", "serve"], "sqlalchemy", "cloud"),
        (["cloud", "serve"], "psycopg", "postgres"),
        (["model", "build-reference"], "torch", "tools"),
        (["cloud", "doctor"], "tensorrt", "gpu"),
        (["demo"], "amqtt", "demo"),
        (["agent", "sample"], "sklearn", "demo"),
    ],
)
def test_missing_module_maps_to_the_extra_that_brings_it(
    argv: list[str], module: str, extra: str
) -> None:
    line = cli.missing_extra_message(argv, module)
    assert line.endswith(f"pip install 'fogline[{extra}]'")
    assert "\n" not in line


def test_postgres_store_without_its_driver_names_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fogline.cloud_service import ConfigError, ResultStore

    # None in sys.modules makes `import psycopg` fail as an uninstalled driver does.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'fogline\[postgres\]'"):
        ResultStore("postgresql+psycopg://ci@127.0.0.1:9/ci", create=False)
