"""Reading TOML configuration: the settings layer every fogline process shares.

:class:`Section` gives typed access to one TOML table and remembers which keys were read,
so a misspelt key is reported instead of silently falling back to a default.
:func:`broker_settings` is the one place a ``[broker]`` table becomes
:class:`~fogline.messaging.MqttSettings`, so both sides accept the same keys with the same rules.

Every problem is a :class:`ConfigValueError` naming the dotted key as it is spelled in the
file (``broker.port must be an integer, got 'x'``). Each package translates it into its own
error root at its boundary, so callers still catch one package's errors.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ._settings import MqttSettings, parse_broker_url

__all__ = ["ConfigValueError", "Section", "broker_settings", "load_toml"]

_T = TypeVar("_T")

_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
}


class ConfigValueError(ValueError):
    """A configuration value is wrong.

    ``key`` is the dotted key (``broker.port``; empty for the file as a whole) and
    ``problem`` what is wrong with it (``must be an integer, got 'x'``); ``source`` is the
    file it was read from, when known. Every config error of every fogline process reads
    the same way, one line: ``agent.toml: broker.port must be an integer, got 'x'``
    (without a file: ``broker.port must be an integer, got 'x'``). A problem with a whole
    table that no single key explains (``whole_table``) reads ``cloud.toml: broker:
    reconnect backoff must satisfy …``, one with the file itself ``cloud.toml: does not
    exist``.
    """

    def __init__(
        self,
        key: str,
        problem: str,
        *,
        whole_table: bool = False,
        source: str | None = None,
    ) -> None:
        if not key:
            message = problem
        elif whole_table:
            message = f"{key}: {problem}"
        else:
            message = f"{key} {problem}"
        super().__init__(f"{source}: {message}" if source else message)
        self.key = key
        self.problem = problem
        self.whole_table = whole_table
        self.source = source

    def in_file(self, source: str) -> ConfigValueError:
        """The same error, naming the file it came from (unless it names one already)."""
        if self.source:
            return self
        return ConfigValueError(self.key, self.problem, whole_table=self.whole_table, source=source)


_TOML_AT_END = " (at end of document)"
_TOML_POSITION = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    """``not valid TOML at line 2, column 8: expected ']' at the end of a table declaration``:
    where first, then tomllib's reason."""
    text = str(exc)
    if (found := _TOML_POSITION.match(text)) is not None:
        where = f"at line {found['line']}, column {found['column']}"
        text = found["what"]
    elif text.endswith(_TOML_AT_END):
        where = "at the end of the file"
        text = text.removesuffix(_TOML_AT_END)
    else:
        return f"not valid TOML: {text}"
    return f"not valid TOML {where}: {text[:1].lower()}{text[1:]}"


def load_toml(path: Path) -> dict[str, Any]:
    """Read and parse one TOML file; a missing, unreadable or malformed file is named."""
    source = str(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigValueError("", "does not exist", source=source) from None
    except UnicodeDecodeError:
        raise ConfigValueError("", "is not UTF-8 text", source=source) from None
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror or exc}"
        raise ConfigValueError("", problem, source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigValueError("", _toml_problem(exc), source=source) from None


def _is_a(value: object, kind: type) -> bool:
    # TOML booleans are Python ints; a flag must never pass for a number.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class Section:
    """Typed access to one TOML table, remembering which keys were read.

    ``prefix`` is the table's dotted name (``""`` for the top level, ``"broker"``), used in
    every error. Relative paths are taken from ``base_dir`` (the config file's directory);
    without one they stay relative. Read what you know, then call :meth:`done` to refuse
    the rest.
    """

    def __init__(
        self, data: Mapping[str, Any], prefix: str = "", *, base_dir: Path | None = None
    ) -> None:
        if not isinstance(data, Mapping):
            problem = f"must be a table, got {type(data).__name__}"
            raise ConfigValueError(prefix, problem if prefix else f"a config {problem}")
        self.prefix = prefix
        self.base_dir = base_dir
        self._data = data
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key of ``name`` in this table (``broker.port``)."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> NoReturn:
        """Raise :class:`ConfigValueError` for key ``name`` of this table."""
        raise ConfigValueError(self.key(name), problem)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        """The value of ``name`` as parsed (``None`` when absent), for keys of several types."""
        self._seen.add(name)
        return self._data.get(name)

    def get(
        self,
        name: str,
        kind: type[_T],
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> _T | None:
        """The value of ``name`` if it is of ``kind`` (an integer passes for a float), or
        ``None`` when absent; numbers are checked against ``minimum`` and ``maximum``."""
        self._seen.add(name)
        if name not in self._data:
            return None
        value: Any = self._data[name]
        if kind is float and _is_a(value, int):
            value = float(value)
        if not _is_a(value, kind):
            self.fail(name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be at most {maximum}, got {value!r}")
        typed: _T = value
        return typed

    def read(self, kinds: Mapping[str, type]) -> dict[str, Any]:
        """The keys of ``kinds`` that are present, each checked against its type."""
        return {name: v for name, kind in kinds.items() if (v := self.get(name, kind)) is not None}

    def table(self, name: str) -> Section:
        """The sub-table ``name``; an absent one reads as empty, so its defaults apply."""
        self._seen.add(name)
        value = self._data.get(name, {})
        if not isinstance(value, Mapping):
            self.fail(name, "must be a table")
        return Section(value, self.key(name), base_dir=self.base_dir)

    def resolve(self, text: str) -> Path:
        """A path from the file: ``~`` expanded, relative ones taken from ``base_dir``."""
        path = Path(text).expanduser()
        if path.is_absolute() or self.base_dir is None:
            return path
        return self.base_dir / path

    def path(self, name: str) -> Path | None:
        """The path that key ``name`` holds (see :meth:`resolve`), or ``None`` when absent."""
        text = self.get(name, str)
        return None if text is None else self.resolve(text)

    def file(self, name: str) -> Path | None:
        """Like :meth:`path`, but the file must exist now: a typo fails at start-up, not at
        the first connection."""
        path = self.path(name)
        if path is not None and not path.is_file():
            self.fail(name, f"names a file that does not exist: {path}")
        return path

    def done(self) -> None:
        """Refuse any key of this table that was never read: it is a typo or unsupported."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            self.fail(unknown[0], "is not a known key")

    def build(self, klass: Callable[..., _T], values: Mapping[str, Any]) -> _T:
        """``klass(**values)``, with a ``ValueError`` from its validation turned into a
        :class:`ConfigValueError`. Validators start their messages with the field's name
        (``port must lie in …``), which becomes the dotted key (``http.port must lie in …``);
        any other message is about the table as a whole."""
        try:
            return klass(**values)
        except ValueError as exc:
            message = str(exc)
            first, _, rest = message.partition(" ")
            first = first.rstrip(":")
            fields = (
                {f.name for f in dataclasses.fields(klass)}
                if isinstance(klass, type) and dataclasses.is_dataclass(klass)
                else set()
            )
            if first in values or first in fields:
                raise ConfigValueError(self.key(first), rest) from None
            raise ConfigValueError(self.prefix, message, whole_table=True) from None


_BROKER_KEYS: dict[str, type] = {
    "host": str,
    "client_id": str,
    "username": str,
    "password": str,
    "tls": bool,
    "tls_insecure": bool,
    "keepalive_s": int,
    "reconnect_min_s": int,
    "reconnect_max_s": int,
    "clean_start": bool,
    "topic_prefix": str,
}
_TLS_FILES = ("ca_file", "cert_file", "key_file")


def _redacted(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced, for messages."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostport}"


def broker_settings(section: Section) -> MqttSettings:
    """Turn a ``[broker]`` table into :class:`MqttSettings`, refusing unknown keys.

    ``url`` (``mqtts://user:password@host:8883``) sets host, port, TLS and credentials at
    once; any of those given as their own keys win over the URL. ``ca_file``,
    ``cert_file`` and ``key_file`` are taken relative to the config file and must exist.
    ``protocol`` may be written as a string or a number (``"5"`` or ``5``).
    """
    values: dict[str, Any] = {}
    url = section.get("url", str)
    if url is not None:
        try:
            values.update(parse_broker_url(url))
        except ValueError as exc:
            section.fail("url", f"is invalid: {str(exc).replace(url, _redacted(url))}")
    values.update(section.read(_BROKER_KEYS))
    if values.get("host") == "":
        section.fail("host", "must not be empty")
    port = section.get("port", int, minimum=1, maximum=65535)
    if port is not None:
        values["port"] = port
    protocol = section.raw("protocol")
    if protocol is not None:
        if _is_a(protocol, int):
            protocol = str(protocol)
        if protocol not in ("3.1.1", "5"):
            section.fail("protocol", f'must be "3.1.1" or "5", got {protocol!r}')
        values["protocol"] = protocol
    timeout = section.get("connect_timeout_s", float)
    if timeout is not None:
        if timeout <= 0:
            section.fail("connect_timeout_s", f"must be positive, got {timeout!r}")
        values["connect_timeout_s"] = timeout
    for name in _TLS_FILES:
        file = section.file(name)
        if file is not None:
            values[name] = str(file)
    section.done()
    return section.build(MqttSettings, values)
