"""``fogline bundle export`` and ``fogline agent import`` / ``agent freshness`` through the
real CLI: a publisher's home on disk, a site's state directory, one file between them."""

from __future__ import annotations

import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from typer.testing import CliRunner

from fogline.cli import app
from fogline.sync._writer import utc_now

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()


def fogline(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def ok_json(*args: str) -> dict:
    code, out, err = fogline(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def home(tmp_path: Path, tiny_bundle: Path) -> Path:
    home = tmp_path / "home"
    ok_json("keys", "init", "--home", str(home), "--site-bins-bits", "4")
    ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "tiny", "--version", "1", "--region",
        "eu", "--onnxruntime", "1.20", "--home", str(home),
    )  # fmt: skip
    return home


def enroll(home: Path, state: Path, site: str = "site-a") -> Path:
    ok_json(
        "agent", "enroll", "--catalogue-root", str(home / "catalogue/metadata/root.json"),
        "--director-root", str(home / "director/metadata/root.json"), "--site", site,
        "--region", "eu", "--state-dir", str(state),
    )  # fmt: skip
    return state


def test_bundle_export_assigns_the_site_once_and_writes_one_tar(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-site-a.tar"
    first = ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home",
                    str(home))  # fmt: skip
    assert first["assigned"] is True
    assert first["bundle"]["name"] == "tiny"
    assert first["bytes"] == out.stat().st_size
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == "export.json"
    assert len(names) == first["members"] + 1
    again = ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home",
                    str(home))  # fmt: skip
    assert again["assigned"] is False


def test_bundle_export_needs_the_directors_key_only_to_assign(home: Path, tmp_path: Path) -> None:
    no_keys = tmp_path / "no-keys"
    no_keys.mkdir(mode=0o700)
    out = tmp_path / "x.tar"
    code, _, err = fogline(
        "bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home", str(home),
        "--keys", str(no_keys),
    )  # fmt: skip
    assert code == 1
    assert err.startswith("error: director targets needs 1 key(s)")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    ok_json("bundle", "assign", "tiny:1", "--site", "site-a", "--home", str(home))
    done = ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home",
                   str(home), "--keys", str(no_keys))  # fmt: skip
    assert done["assigned"] is False
    assert out.is_file()


def test_bundle_export_of_an_unreleased_bundle_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    code, _, err = fogline(
        "bundle", "export", "tiny:9", "--site", "site-a", "-o", str(tmp_path / "x.tar"),
        "--home", str(home),
    )  # fmt: skip
    assert (code, err) == (2, "error: tiny@9 is not released\n")


def test_agent_import_installs_then_reports_already_installed(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.tar"
    ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home", str(home))
    state = enroll(home, tmp_path / "site")
    got = ok_json("agent", "import", str(out), "--state-dir", str(state))
    assert got["bundle"]["name"] == "tiny"
    assert got["already_installed"] is False
    assert Path(got["path"]) == state / "bundles" / "tiny" / "1"
    assert got["freshness"]["stale"] is False
    assert json.loads((state / "installed.json").read_text())["releases"] == {"tiny": 1}
    code, text, _ = fogline("agent", "import", str(out), "--state-dir", str(state))
    assert code == 0
    assert "tiny@1 (release 1) already installed" in text
    fresh = ok_json("agent", "freshness", "--state-dir", str(state))
    assert fresh["stale"] is False
    assert set(fresh["repositories"]["director"]["roles"]) >= {"timestamp", "snapshot", "targets"}


def test_agent_import_of_a_tampered_export_is_refused_in_one_line(
    home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.tar"
    ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home", str(home))
    data = bytearray(out.read_bytes())
    with tarfile.open(out) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".edge.onnx"))
    data[member.offset_data + member.size // 2] ^= 0x01
    out.write_bytes(bytes(data))
    state = enroll(home, tmp_path / "site")
    code, _, err = fogline("agent", "import", str(out), "--state-dir", str(state))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: catalogue: ")
    assert "edge.onnx" in lines[0]
    assert not (state / "installed.json").exists()


def test_agent_import_of_an_export_for_another_site_is_refused(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.tar"
    ok_json("bundle", "export", "tiny:1", "--site", "site-b", "-o", str(out), "--home", str(home))
    state = enroll(home, tmp_path / "site")
    code, _, err = fogline("agent", "import", str(out), "--state-dir", str(state))
    assert code == 2
    assert err == f"error: {out} is an export for site 'site-b', not 'site-a'\n"


def test_agent_import_of_a_missing_or_foreign_file(home: Path, tmp_path: Path) -> None:
    state = enroll(home, tmp_path / "site")
    code, _, err = fogline("agent", "import", str(tmp_path / "nope.tar"), "--state-dir", str(state))
    assert code == 1
    assert err.startswith("error: cannot read ")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not an export\n" * 100)
    code, _, err = fogline("agent", "import", str(foreign), "--state-dir", str(state))
    assert (code, err) == (2, f"error: {foreign} is not a fogline export: not a tar file\n")


def test_agent_freshness_of_a_site_never_refreshed_exits_1(home: Path, tmp_path: Path) -> None:
    state = enroll(home, tmp_path / "site")
    code, text, _ = fogline("agent", "freshness", "--state-dir", str(state))
    assert code == 1
    assert "never fetched" in text
    assert "stale" in text


def test_an_export_from_an_air_gapped_home_imports_months_later(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    home = tmp_path / "air-gapped"
    ok_json(
        "keys", "init", "--home", str(home), "--site-bins-bits", "4",
        "--expiry", "timestamp=180", "--expiry", "snapshot=180",
        "--expiry", "director.targets=180", "--expiry", "catalogue.targets=365",
        "--expiry", "root=730",
    )  # fmt: skip
    ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "tiny", "--version", "1", "--region",
        "eu", "--onnxruntime", "1.20", "--home", str(home),
    )  # fmt: skip
    out = tmp_path / "tiny.tar"
    ok_json("bundle", "export", "tiny:1", "--site", "site-a", "-o", str(out), "--home", str(home))
    state = enroll(home, tmp_path / "site")
    with time_machine.travel(utc_now() + timedelta(days=100), tick=False):
        got = ok_json("agent", "import", str(out), "--state-dir", str(state))
        assert got["freshness"]["stale"] is False
    with time_machine.travel(utc_now() + timedelta(days=200), tick=False):
        code, text, _ = fogline("agent", "freshness", "--state-dir", str(state))
        assert code == 1  # 180 days passed: the timestamps expired; the bundle stays
        assert "stale" in text
        assert (state / "bundles" / "tiny" / "1" / "manifest.json").is_file()


def test_agent_freshness_of_a_directory_never_enrolled_is_an_error(tmp_path: Path) -> None:
    code, _, err = fogline("agent", "freshness", "--state-dir", str(tmp_path / "none"))
    assert (code, err) == (1, f"error: {tmp_path / 'none'} is not an enrolled site: no site.json\n")
