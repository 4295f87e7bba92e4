"""Bearer tokens: minting, hashed storage, token files and ``fogline cloud token create``."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fogline._cli_cloud import token_command
from fogline.cloud_service._auth import (
    TOKEN_PREFIX,
    Scope,
    TokenEntry,
    TokenStore,
    add_token,
    generate_token,
    hash_token,
    load_token_store,
    write_token_file,
)
from fogline.cloud_service.errors import ConfigError


def _cli() -> typer.Typer:
    app = typer.Typer()
    token = typer.Typer()
    token.command("create")(token_command)
    app.add_typer(token, name="token")
    return app


def test_a_minted_token_is_random_and_only_its_hash_is_kept() -> None:
    secret, entry = generate_token("app", [Scope.INFER])
    other, _ = generate_token("app", [Scope.INFER])
    assert secret.startswith(TOKEN_PREFIX)
    assert secret != other
    assert len(secret) >= 40
    assert entry.sha256 == hashlib.sha256(secret.encode()).hexdigest() == hash_token(secret)
    assert secret not in json.dumps(entry.to_json())


def test_the_store_finds_the_token_and_its_scopes() -> None:
    app_secret, app_entry = generate_token("app", ["infer"])
    ops_secret, ops_entry = generate_token("ops", [Scope.ADMIN])
    store = TokenStore([app_entry, ops_entry])
    assert store.authenticate(app_secret) == app_entry
    assert store.authenticate(ops_secret) == ops_entry
    assert store.authenticate(app_secret + "x") is None
    assert store.authenticate("") is None
    assert app_entry.allows(Scope.INFER)
    assert not app_entry.allows(Scope.READ)
    assert all(ops_entry.allows(s) for s in Scope)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_token_files_round_trip_as_toml_or_json_with_mode_0600(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tokens{suffix}"
    secret, entry = generate_token("dash.board-1", [Scope.READ, Scope.INFER])
    add_token(path, entry)
    second_secret, second = generate_token("ops", [Scope.ADMIN])
    add_token(path, second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert secret not in text
    assert second_secret not in text
    store = load_token_store(path)
    assert store.entries == (entry, second)
    assert store.authenticate(second_secret) == second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_token_name_cannot_be_added_twice(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    add_token(path, generate_token("app", [Scope.INFER])[1])
    with pytest.raises(ConfigError, match="already has a token named 'app'"):
        add_token(path, generate_token("app", [Scope.READ])[1])


def test_rewriting_a_token_file_keeps_it_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("")
    path.chmod(0o644)
    write_token_file(path, [generate_token("app", [Scope.INFER])[1]])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[[tokens]\n", "not valid TOML"),
        ('tokens = "x"\n', "'tokens' must be a list"),
        ("other = 1\n", "unknown key(s) other"),
        ('[[tokens]]\nname = "a"\nsha256 = "00"\nscopes = ["infer"]\n', "64 lowercase hex"),
        (
            f'[[tokens]]\nname = "a"\nsha256 = "{"a" * 64}"\nscopes = ["root"]\n',
            "unknown scope(s) 'root'",
        ),
        (
            f'[[tokens]]\nname = "a"\nsha256 = "{"a" * 64}"\nscopes = []\n',
            "at least one scope",
        ),
        (
            f'[[tokens]]\nname = "a b"\nsha256 = "{"a" * 64}"\nscopes = ["read"]\n',
            "token name 'a b'",
        ),
        (
            f'[[tokens]]\nname = "a"\nsha256 = "{"a" * 64}"\nscopes = ["read"]\ntoken = "s"\n',
            "unknown key(s) token",
        ),
        (
            f'[[tokens]]\nname = "a"\nsha256 = "{"a" * 64}"\nscopes = ["read"]\n'
            f'[[tokens]]\nname = "a"\nsha256 = "{"b" * 64}"\nscopes = ["read"]\n',
            "more than once: a",
        ),
    ],
)
def test_bad_token_files_are_refused_with_the_reason(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_token_store(path)
    assert fragment in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_or_non_json_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_token_store(tmp_path / "absent.toml")
    bad = tmp_path / "tokens.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_token_store(bad)


def test_an_empty_token_file_accepts_nobody(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("# none yet\n")
    store = load_token_store(path)
    assert len(store) == 0
    assert store.authenticate("fgl_anything") is None


def test_entries_validate_themselves() -> None:
    with pytest.raises(ValueError, match="token name"):
        TokenEntry("", "a" * 64, frozenset({Scope.READ}))
    with pytest.raises(TypeError, match="not a Scope"):
        TokenEntry("a", "a" * 64, frozenset({"read"}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'root' is not a valid Scope"):
        generate_token("a", ["root"])


def test_token_create_prints_the_secret_once_and_stores_only_its_hash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.toml"
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(
            _cli(),
            [
                "token",
                "create",
                "--name",
                "app",
                "--scope",
                "infer",
                "--scope",
                "read",
                "--file",
                str(path),
            ],
        )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith(TOKEN_PREFIX)
    assert "only time" in result.stderr
    assert secret not in result.stderr
    assert secret not in path.read_text()
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = load_token_store(path).entries
    assert entry.name == "app"
    assert entry.scopes == {Scope.INFER, Scope.READ}
    assert load_token_store(path).authenticate(secret) == entry


def test_token_create_refuses_a_duplicate_name_and_an_unknown_scope(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    runner = CliRunner()
    args = ["token", "create", "--name", "app", "--scope", "infer", "--file", str(path)]
    assert runner.invoke(_cli(), args).exit_code == 0
    again = runner.invoke(_cli(), args)
    assert again.exit_code == 2
    assert "already has a token named 'app'" in again.stderr
    assert again.stdout == ""
    bad = runner.invoke(_cli(), [*args[:4], "--scope", "root", "--file", str(path)])
    assert bad.exit_code == 2
    assert len(json.loads(path.read_text())["tokens"]) == 1
