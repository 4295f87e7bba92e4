"""One table of bad configuration files, read by the agent and by the cloud: both say what
is wrong in the same one line (file, dotted key, problem) and exit with the same code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fogline.cloud_service import CloudConfig
from fogline.cloud_service import ConfigError as CloudConfigError
from fogline.edge_agent import ConfigError as AgentConfigError
from fogline.edge_agent._config import load_config

FOGLINE = str(Path(sys.executable).with_name("fogline"))

# (file contents, what the error says after "<file>: "); the agent gets its site from
# --site, so both sides read the very same bytes.
BAD_FILES: list[tuple[bytes | None, str]] = [
    (b'[http]\nport = "x"\n', "http.port must be an integer, got 'x'"),
    (b"[http]\nport = 70000\n", "http.port must be at most 65535, got 70000"),
    (b"[http]\nport = -1\n", "http.port must be at least 0, got -1"),
    (b"colour = 3\n", "colour is not a known key"),
    (b"[http]\nprot = 8080\n", "http.prot is not a known key"),
    (b"http = 3\n", "http must be a table"),
    (b"[broker]\nport = 0\n", "broker.port must be at least 1, got 0"),
    (b'[broker]\nkeepalive_s = "30"\n', "broker.keepalive_s must be an integer, got '30'"),
    (b'[broker]\nprotocol = "4"\n', 'broker.protocol must be "3.1.1" or "5", got \'4\''),
    (
        b'[broker]\nurl = "http://x"\n',
        "broker.url is invalid: broker URL 'http://x' must start with mqtt:// or mqtts://",
    ),
    (
        b"[broker]\nreconnect_min_s = 5\nreconnect_max_s = 1\n",
        "broker: reconnect backoff must satisfy 0 < reconnect_min_s <= reconnect_max_s",
    ),
    (b'[broker]\nca_file = "nope.pem"\n', "broker.ca_file names a file that does not exist: "),
    (
        b"[broker\nport = 1\n",
        "not valid TOML at line 1, column 8: expected ']' at the end of a table declaration",
    ),
    (b"x = [\n", "not valid TOML at the end of the file: invalid value"),
    (b"port = '\xff'\n", "is not UTF-8 text"),
    (None, "does not exist"),
]
IDS = [problem.split(":")[0].split(" ")[0] or "file" for _, problem in BAD_FILES]
IDS = [f"{i}-{name}" for i, name in enumerate(IDS)]


def _write(tmp_path: Path, contents: bytes | None) -> Path:
    path = tmp_path / "service.toml"
    if contents is not None:
        path.write_bytes(contents)
    return path


@pytest.mark.parametrize(("contents", "problem"), BAD_FILES, ids=IDS)
def test_the_agent_and_the_cloud_word_a_bad_file_alike(
    tmp_path: Path, contents: bytes | None, problem: str
) -> None:
    path = _write(tmp_path, contents)
    with pytest.raises(AgentConfigError) as agent:
        load_config(path, {"site": "a"})
    with pytest.raises(CloudConfigError) as cloud:
        CloudConfig.from_toml(path)

    assert str(agent.value) == str(cloud.value)
    assert str(agent.value).startswith(f"{path}: {problem}")


@pytest.mark.parametrize(("contents", "problem"), BAD_FILES, ids=IDS)
def test_both_commands_print_the_same_one_error_line_and_exit_2(
    tmp_path: Path, contents: bytes | None, problem: str
) -> None:
    path = _write(tmp_path, contents)
    commands = {
        "agent": [FOGLINE, "agent", "run", "--config", str(path), "--site", "a"],
        "cloud": [FOGLINE, "cloud", "serve", "--config", str(path)],
    }
    procs = {
        side: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for side, args in commands.items()
    }
    outcome = {}
    for side, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        outcome[side] = (proc.returncode, stdout, stderr.splitlines())

    assert outcome["agent"] == outcome["cloud"]
    code, stdout, lines = outcome["agent"]
    assert (code, stdout) == (2, "")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: {problem}")


def test_a_directory_given_as_the_file_is_named_alike(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError) as agent:
        load_config(tmp_path, {"site": "a"})
    with pytest.raises(CloudConfigError) as cloud:
        CloudConfig.from_toml(tmp_path)
    assert str(agent.value) == str(cloud.value) == f"{tmp_path}: cannot be read: Is a directory"


def test_a_value_given_on_the_command_line_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, b"[http]\nport = 9000\n")
    with pytest.raises(AgentConfigError) as info:
        load_config(path, {"site": "a b"})
    assert info.value.source is None
    assert str(info.value).startswith("site 'a b' is not usable as an MQTT topic level")
