"""The ``fogline`` command line itself: help at every level, one-line usage errors."""

from __future__ import annotations

import inspect
import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fogline import __version__
from fogline.cli import app

FOGLINE = str(Path(sys.executable).with_name("fogline"))
NARROW, WIDE = 80, 200


def _commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group under ``fogline``, with its path of names."""

    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from walk([*path, name], sub)

    yield from walk([], typer.main.get_command(app))


COMMANDS = list(_commands())
IDS = [" ".join(path) or "fogline" for path, _ in COMMANDS]


def _help(path: list[str], width: int, flag: str = "--help") -> str:
    result = CliRunner().invoke(app, [*path, flag], terminal_width=width, max_content_width=width)
    assert result.exit_code == 0, result.output
    return result.stdout


def _source_texts(command: Any) -> list[str]:
    """The help texts as written in the code: the docstring and every parameter's help."""
    texts = [command.help or ""]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return texts


def test_every_command_is_walked() -> None:
    names = set(IDS)
    assert {"fogline", "agent run", "agent sample", "cloud token create", "model quantize"} <= names
    assert len(COMMANDS) > 15


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_renders_without_markup_debris(path: list[str], command: Any) -> None:
    text = _help(path, NARROW)
    assert "<bool>" not in text
    assert "``" not in text
    assert "module docstring" not in text
    assert "Usage: fogline" in text


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_option_and_argument_says_what_it_is_for(path: list[str], command: Any) -> None:
    ctx = typer.Context(command, info_name="fogline")
    helpless = [
        p.name
        for p in command.get_params(ctx)
        if not getattr(p, "help", None) and not getattr(p, "hidden", False)
    ]
    assert helpless == []
    assert command.help, f"{' '.join(path)} has no help text"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_square_bracketed_config_names_survive_in_help(path: list[str], command: Any) -> None:
    text = " ".join(_help(path, WIDE).split())
    for source in _source_texts(command):
        for name in re.findall(r"\[[a-z_][a-z0-9_.]*\]", source):
            assert name in text, f"{name} lost from {' '.join(['fogline', *path])} --help"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_says_the_same_words_at_any_width(path: list[str], command: Any) -> None:
    # A short help cut to fit ("broker, cloud worker, one...") or a paragraph cut off
    # would differ between the two widths.
    assert _help(path, NARROW).split() == _help(path, WIDE).split()


def _source_line_breaks(text: str) -> Iterator[tuple[str, str]]:
    """The word pairs a help text's own line breaks fall between, paragraph by paragraph."""
    for paragraph in inspect.cleandoc(text).partition("\f")[0].split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        for before, after in itertools.pairwise(lines):
            yield before.split()[-1], after.split()[0]


def _on_one_line(rendered: str, pair: tuple[str, str]) -> bool:
    joined = " ".join(pair)
    return any(joined in " ".join(line.split()) for line in rendered.splitlines())


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_no_paragraph_is_broken_mid_sentence(path: list[str], command: Any) -> None:
    # Where the source breaks a line inside a paragraph, the help must join the two
    # words on one line at one width at least: broken at both, the break is the
    # docstring's own, kept, and the paragraph reads as cut off mid-sentence.
    narrow, wide = _help(path, NARROW), _help(path, WIDE)
    for source in _source_texts(command):
        for pair in _source_line_breaks(source):
            assert _on_one_line(wide, pair) or _on_one_line(narrow, pair), (
                f"fogline {' '.join(path)} --help breaks a paragraph between {pair}"
            )


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_dash_h_is_help_at_every_level(path: list[str], command: Any) -> None:
    assert _help(path, NARROW, "-h") == _help(path, NARROW, "--help")


def test_version_flag_prints_the_version_and_exits_0() -> None:
    proc = subprocess.run(
        [FOGLINE, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, __version__, "")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["cloud", "token", "create", "--name", "a", "--scope", "write"],
            "error: --scope: 'write' is not one of 'infer', 'read', 'admin'",
        ),
        (
            ["cloud", "token", "create", "--name", "a"],
            "error: missing option --scope; see 'fogline cloud token create --help'",
        ),
        (
            ["model", "split", "--at", "x", "-o", "out"],
            "error: missing argument MODEL; see 'fogline model split --help'",
        ),
        (
            ["cloud", "serve", "--zzz"],
            "error: no such option: --zzz; see 'fogline cloud serve --help'",
        ),
        (["cloud", "serv"], "error: no such command 'serv'; did you mean 'serve'?"),
        (["nonsense"], "error: no such command 'nonsense'; see 'fogline --help'"),
        (["cloud", "serve", "--port"], "error: option '--port' requires an argument"),
        (["demo", "--samples", "x"], "error: --samples: "),
        (["model", "quantize", "m", "-o", "o", "--calibration", "c", "--metric", "f1"], "error: "),
    ],
)
def test_a_usage_error_is_one_line_on_stderr_and_exit_code_2(args: list[str], line: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(line)


def test_a_usage_error_from_the_installed_command_is_one_line_too() -> None:
    proc = subprocess.run(
        [FOGLINE, "cloud", "token", "create", "--name", "a", "--scope", "write"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --scope: 'write' is not one of 'infer', 'read', 'admin'"
    ]
