"""The sync commands through the real ``fogline`` CLI: keys init/rotate/refresh, bundle
publish/ls/show/assign, model publish, agent enroll; key files owner-only."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fogline.cli import app
from fogline.sync import MemoryFetcher, SiteSync, SyncHome
from fogline.sync._store import DirectoryStore

from .conftest import CATALOGUE_URL, DIRECTOR_URL

runner = CliRunner()


def fogline(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def ok_json(*args: str) -> dict:
    code, out, err = fogline(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    ok_json(
        "keys", "init", "--home", str(home), "--root-keys", "3", "--root-threshold", "2",
        "--site-bins-bits", "4",
    )  # fmt: skip
    return home


def test_keys_init_writes_every_key_owner_only(home: Path) -> None:
    keys = home / "keys"
    files = sorted(keys.rglob("*.pem"))
    # 3 root keys + targets, snapshot, timestamp, for each repository.
    assert len(files) == 12
    assert all(mode(f) == 0o600 for f in files)
    dirs = [keys, *(p for p in keys.rglob("*") if p.is_dir())]
    assert all(mode(d) == 0o700 for d in dirs)
    for repo in ("catalogue", "director"):
        root = json.loads((home / repo / "metadata" / "1.root.json").read_bytes())
        assert root["signed"]["roles"]["root"]["threshold"] == 2
        assert len(root["signed"]["roles"]["root"]["keyids"]) == 3
        assert root["signed"]["consistent_snapshot"] is True


def test_keys_init_never_prints_a_private_key(tmp_path: Path) -> None:
    code, out, err = fogline("keys", "init", "--home", str(tmp_path / "h"))
    assert code == 0
    secrets = [f.read_text() for f in (tmp_path / "h" / "keys").rglob("*.pem")]
    body = "".join(s.splitlines()[1] for s in secrets)
    assert "PRIVATE KEY" not in out + err
    assert body[:20] not in out + err


def test_keys_init_refuses_a_home_that_has_repositories(home: Path) -> None:
    code, _, err = fogline("keys", "init", "--home", str(home))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {home} already holds repositories"]


def test_keys_init_refuses_a_threshold_above_the_key_count(tmp_path: Path) -> None:
    code, _, err = fogline(
        "keys", "init", "--home", str(tmp_path / "h"), "--root-keys", "2", "--root-threshold", "3"
    )
    assert code == 2
    assert "--root-threshold 3 must lie in [1, 2]" in err
    assert not (tmp_path / "h" / "catalogue").exists()


def test_keys_init_sets_expiry_periods(tmp_path: Path) -> None:
    home = tmp_path / "h"
    ok_json(
        "keys", "init", "--home", str(home), "--expiry", "timestamp=2", "--expiry",
        "director.targets=3",
    )  # fmt: skip
    settings = json.loads((home / "settings.json").read_text())
    assert settings["expiry"]["catalogue"]["timestamp_days"] == 2
    assert settings["expiry"]["director"]["timestamp_days"] == 2
    assert settings["expiry"]["director"]["targets_days"] == 3
    assert settings["expiry"]["catalogue"]["targets_days"] == 90


def test_a_bad_expiry_setting_is_one_line(tmp_path: Path) -> None:
    code, _, err = fogline("keys", "init", "--home", str(tmp_path / "h"), "--expiry", "lunch=2")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "ROLE=DAYS" in err


def test_publish_ls_and_show(home: Path, tiny_bundle: Path) -> None:
    released = ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "tiny", "--version", "1",
        "--region", "eu", "--region", "us", "--onnxruntime", "1.20", "--home", str(home),
    )  # fmt: skip
    assert released["release"] == 1
    assert released["regions"] == ["eu", "us"]
    assert released["platform"] == {
        "onnxruntime": "1.20",
        "execution_provider": "CPUExecutionProvider",
    }
    ok_json(
        "model", "publish", str(tiny_bundle), "--name", "tiny", "--version", "2",
        "--region", "eu", "--home", str(home),
    )  # fmt: skip
    listed = ok_json("bundle", "ls", "--home", str(home))
    assert [(b["name"], b["version"], b["release"]) for b in listed["bundles"]] == [
        ("tiny", "1", 1),
        ("tiny", "2", 2),
    ]
    shown = ok_json("bundle", "show", "tiny:2", "--home", str(home))
    assert set(shown["files"]) == {"edge.onnx", "cloud.onnx"}
    assert shown["signatures"]["edge"]["inputs"] == [
        {"name": "frame", "type": "tensor(uint8)", "shape": ["N", 1, 8, 8]}
    ]
    assert shown["signatures"]["cloud"]["outputs"][0]["name"] == "probs"
    code, out, _ = fogline("bundle", "ls", "--home", str(home))
    assert code == 0
    assert "tiny@2" in out


def test_publish_refuses_a_release_counter_that_does_not_grow(
    home: Path, tiny_bundle: Path
) -> None:
    base = ["--region", "eu", "--home", str(home)]
    ok_json("bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", *base)
    ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "5", "--release",
        "5", *base,
    )  # fmt: skip
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "6", "--release",
        "5", *base,
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        "error: release counter 5 of 't' must be greater than 5, the highest released so far"
    ]
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "5", *base
    )
    assert code == 2
    assert err.strip().splitlines() == ["error: t@5 is already released; releases are immutable"]


def test_publish_of_a_tampered_bundle_is_refused(home: Path, tiny_bundle: Path) -> None:
    (tiny_bundle / "edge.onnx").write_bytes(b"not the model")
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--home", str(home),
    )  # fmt: skip
    assert code == 2
    assert "edge.onnx has the wrong size" in err
    assert ok_json("bundle", "ls", "--home", str(home)) == {"bundles": []}


def test_publish_without_a_home_says_how_to_make_one(tmp_path: Path, tiny_bundle: Path) -> None:
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--home", str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 1
    assert "run `fogline keys init`" in err


def test_show_of_an_unreleased_bundle_is_one_line(home: Path) -> None:
    code, _, err = fogline("bundle", "show", "nope:1", "--home", str(home))
    assert code == 2
    assert err.strip().splitlines() == ["error: nope:1 is not released"]


def test_publish_without_the_release_key_fails_and_names_it(home: Path, tiny_bundle: Path) -> None:
    for key in (home / "keys" / "catalogue" / "targets").iterdir():
        key.unlink()  # the release key is offline
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--home", str(home),
    )  # fmt: skip
    assert code == 1
    assert "catalogue targets needs 1 key(s); 0 found" in err


def test_a_key_file_open_to_others_is_refused(home: Path, tiny_bundle: Path) -> None:
    (key,) = (home / "keys" / "catalogue" / "targets").iterdir()
    key.chmod(0o644)
    code, _, err = fogline(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--home", str(home),
    )  # fmt: skip
    assert code == 1
    assert "is open to others (mode 0644)" in err


def test_keys_rotate_root_and_release_keys(home: Path, tiny_bundle: Path) -> None:
    old_root = {p.name for p in (home / "keys" / "catalogue" / "root").iterdir()}
    rotated = ok_json("keys", "rotate", "root", "--home", str(home))
    assert rotated == {
        "repository": "catalogue",
        "role": "root",
        "keys": 3,
        "threshold": 2,
        "root_version": 2,
    }
    new_root = {p.name for p in (home / "keys" / "catalogue" / "root").iterdir()}
    assert len(new_root) == 3
    assert not new_root & old_root
    assert all(mode(p) == 0o600 for p in (home / "keys" / "catalogue" / "root").iterdir())
    root2 = json.loads((home / "catalogue" / "metadata" / "2.root.json").read_bytes())
    signed_by = {s["keyid"] for s in root2["signatures"]}
    assert {Path(n).stem for n in old_root} <= signed_by  # the old threshold agreed
    assert {Path(n).stem for n in new_root} <= signed_by
    ok_json("keys", "rotate", "targets", "--home", str(home))
    ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--home", str(home),
    )  # fmt: skip
    rotated = ok_json("keys", "rotate", "timestamp", "-r", "director", "--home", str(home))
    assert rotated["root_version"] == 2


def test_a_site_follows_rotations_made_with_the_cli(home: Path, tiny_bundle: Path) -> None:
    state = home.parent / "site"
    ok_json(
        "agent", "enroll", "--catalogue-root", str(home / "catalogue/metadata/root.json"),
        "--director-root", str(home / "director/metadata/root.json"), "--site", "site-a",
        "--region", "eu", "--state-dir", str(state),
    )  # fmt: skip
    for role in ("root", "targets", "snapshot", "timestamp"):
        ok_json("keys", "rotate", role, "--home", str(home))
        ok_json("keys", "rotate", role, "-r", "director", "--home", str(home))
    ok_json(
        "bundle", "publish", str(tiny_bundle), "--name", "t", "--version", "1", "--region",
        "eu", "--onnxruntime", "1.20", "--home", str(home),
    )  # fmt: skip
    ok_json("bundle", "assign", "t:1", "--site", "site-a", "--home", str(home))
    fetcher = MemoryFetcher()
    fetcher.mount(CATALOGUE_URL, DirectoryStore(home / "catalogue"))
    fetcher.mount(DIRECTOR_URL, DirectoryStore(home / "director"))
    site = SiteSync(
        state,
        catalogue_url=CATALOGUE_URL,
        director_url=DIRECTOR_URL,
        agent_version="0.1.0",
        onnxruntime="1.32.0",
        fetcher=fetcher,
    )
    got = site.update()
    assert got is not None
    assert got.id == "t@1"


def test_agent_enroll_writes_the_site_key_owner_only(home: Path, tmp_path: Path) -> None:
    state = tmp_path / "site"
    data = ok_json(
        "agent", "enroll", "--catalogue-root", str(home / "catalogue/metadata/root.json"),
        "--director-root", str(home / "director/metadata/root.json"), "--site", "plant-7",
        "--region", "eu", "--state-dir", str(state),
    )  # fmt: skip
    assert data["site"] == "plant-7"
    assert data["public_key"]["keytype"] == "ed25519"
    assert mode(state) == 0o700
    assert mode(state / "site.key") == 0o600
    assert mode(state / "trust") == 0o700
    assert "PRIVATE" not in json.dumps(data)
    code, _, err = fogline(
        "agent", "enroll", "--catalogue-root", str(home / "catalogue/metadata/root.json"),
        "--director-root", str(home / "director/metadata/root.json"), "--site", "plant-7",
        "--region", "eu", "--state-dir", str(state),
    )  # fmt: skip
    assert code == 2
    assert "already enrolled" in err


def test_agent_enroll_refuses_one_root_for_both_repositories(home: Path, tmp_path: Path) -> None:
    root = str(home / "catalogue/metadata/root.json")
    code, _, err = fogline(
        "agent", "enroll", "--catalogue-root", root, "--director-root", root, "--site", "s",
        "--region", "eu", "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2
    assert "same file" in err
    assert not (tmp_path / "s").exists()


def test_keys_refresh_resigns_what_is_due(home: Path) -> None:
    settings = json.loads((home / "settings.json").read_text())
    # A timestamp valid for 1 day is due within 12 hours: make 2 days "half" by asking for 4.
    settings["expiry"]["catalogue"]["timestamp_days"] = 4
    (home / "settings.json").write_text(json.dumps(settings))
    before = json.loads((home / "catalogue/metadata/timestamp.json").read_text())
    data = ok_json("keys", "refresh", "--home", str(home))
    assert data["catalogue"]["resigned"] == ["timestamp"]
    assert data["director"]["resigned"] == []
    after = json.loads((home / "catalogue/metadata/timestamp.json").read_text())
    assert after["signed"]["version"] == before["signed"]["version"] + 1
    assert SyncHome(home).writer("catalogue").timestamp().version == after["signed"]["version"]


def test_keys_refresh_names_an_offline_key_that_is_due(home: Path) -> None:
    settings = json.loads((home / "settings.json").read_text())
    settings["expiry"]["catalogue"]["targets_days"] = 1000
    (home / "settings.json").write_text(json.dumps(settings))
    for key in (home / "keys" / "catalogue" / "targets").iterdir():
        key.unlink()
    code, out, _ = fogline("keys", "refresh", "--home", str(home), "--json")
    assert code == 1
    assert json.loads(out)["catalogue"]["due_without_key"] == ["targets"]


def test_the_sync_commands_join_their_groups() -> None:
    for group, command in (("model", "publish"), ("agent", "enroll"), ("bundle", "ls")):
        code, out, _ = fogline(group, "--help")
        assert code == 0
        assert command in out
    code, out, _ = fogline("agent", "--help")
    assert "run" in out  # the agent's own commands are still there


def test_without_tuf_a_command_names_the_edge_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tuf'] = None; "
        "sys.argv = ['fogline', 'keys', 'init', '--home', sys.argv[1]]; "
        "from fogline.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: this command needs the 'edge' extra (missing module tuf): "
        "pip install 'fogline[edge]'"
    ]
