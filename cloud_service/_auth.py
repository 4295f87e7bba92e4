"""Bearer tokens with scopes for the cloud's inference API.

A token file lists who may call and what for; it holds only each token's SHA-256, never
the token, so a leaked file grants nothing. TOML (``tokens.toml``)::

    [[tokens]]
    name = "dashboard"
    sha256 = "9f86d081884c7d65…"
    scopes = ["read"]

or the same as JSON (``{"tokens": [{"name": …, "sha256": …, "scopes": […]}]}``) for a file
whose name ends in ``.json``.

Scopes: ``infer`` (``POST …/infer``), ``read`` (server and model metadata, model
readiness), ``admin`` (everything, including loading and unloading models). Health
endpoints need no token.

``fogline cloud token create`` mints a token (:func:`generate_token`), prints it once and
appends its hash to the file (:func:`add_token`). This module stays free of FastAPI and
numpy so the CLI can import it cheaply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fogline.cloud_service.errors import ConfigError

__all__ = [
    "TOKEN_PREFIX",
    "Scope",
    "TokenEntry",
    "TokenStore",
    "add_token",
    "generate_token",
    "hash_token",
    "load_token_store",
    "write_token_file",
]

# Marks a string as a fogline token (for secret scanners and humans); not a secret.
TOKEN_PREFIX = "fgl_"  # noqa: S105
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# 32 random bytes: 256 bits, far beyond any brute force of the stored hash.
_TOKEN_BYTES = 32


class Scope(StrEnum):
    """What a token may do. ``ADMIN`` implies the others."""

    INFER = "infer"
    READ = "read"
    ADMIN = "admin"


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 of ``token`` (UTF-8), as stored in a token file.

    A single fast hash is the right tool here, unlike for passwords: tokens are 256-bit
    random strings minted by :func:`generate_token`, so there is nothing to guess that a
    slow, salted password hash (bcrypt, Argon2) would protect, and checking a request costs
    one SHA-256 instead of tens of milliseconds of deliberate work.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """One configured token: a name for logs and audits, its SHA-256, its scopes."""

    name: str
    sha256: str
    scopes: frozenset[Scope]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"token name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit"
            )
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(
                f"token {self.name!r}: sha256 must be 64 lowercase hex digits "
                f"(the hash of the token, never the token itself)"
            )
        if not self.scopes:
            raise ValueError(f"token {self.name!r} needs at least one scope")
        for scope in self.scopes:
            if not isinstance(scope, Scope):
                raise TypeError(f"token {self.name!r}: scope {scope!r} is not a Scope")

    def allows(self, scope: Scope) -> bool:
        """Whether this token may do what ``scope`` guards."""
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def to_json(self) -> dict[str, Any]:
        """The entry as written to a token file (scopes sorted)."""
        return {"name": self.name, "sha256": self.sha256, "scopes": sorted(self.scopes)}

    @classmethod
    def from_json(cls, raw: object, where: str) -> TokenEntry:
        """An entry read from a file; ``where`` names it in errors (``tokens[2]``)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table with name, sha256 and scopes")
        unknown = sorted(set(raw) - {"name", "sha256", "scopes"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        scopes = raw.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ConfigError(f"{where}.scopes must be a list of strings")
        valid = {s.value for s in Scope}
        bad = [s for s in scopes if s not in valid]
        if bad:
            raise ConfigError(
                f"{where}.scopes: unknown scope(s) {', '.join(map(repr, bad))}; "
                f"known: {', '.join(sorted(valid))}"
            )
        try:
            return cls(
                name=raw.get("name"),  # type: ignore[arg-type]
                sha256=raw.get("sha256"),  # type: ignore[arg-type]
                scopes=frozenset(Scope(s) for s in scopes),
            )
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


class TokenStore:
    """The configured tokens; :meth:`authenticate` finds the one a request presents."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        names = [e.name for e in self._entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"token name(s) used more than once: {', '.join(duplicates)}")
        hashes = [e.sha256 for e in self._entries]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two token entries carry the same sha256")

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry whose hash matches ``token``, or ``None``.

        Every entry is compared with :func:`hmac.compare_digest` and the loop never stops
        early, so the time taken says nothing about which stored hash came close.
        """
        digest = hash_token(token)
        found: TokenEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _read_entries(path: Path) -> list[TokenEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path} is unreadable: {exc}") from None
    try:
        document: Any = json.loads(text) if _is_json(path) else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if _is_json(path) else "TOML"
        raise ConfigError(f"token file {path} is not valid {kind}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"token file {path} must hold an object with a 'tokens' list")
    unknown = sorted(set(document) - {"tokens"})
    if unknown:
        raise ConfigError(f"token file {path}: unknown key(s) {', '.join(unknown)}")
    raw = document.get("tokens", [])
    if not isinstance(raw, list):
        raise ConfigError(f"token file {path}: 'tokens' must be a list of tables")
    return [TokenEntry.from_json(item, f"{path}: tokens[{i}]") for i, item in enumerate(raw)]


def load_token_store(path: Path) -> TokenStore:
    """The tokens of a TOML or JSON token file; :class:`ConfigError` names what is wrong.

    An empty file (no tokens) is allowed: every protected endpoint then answers 401.
    """
    entries = _read_entries(path)
    try:
        return TokenStore(entries)
    except ValueError as exc:
        raise ConfigError(f"token file {path}: {exc}") from None


def generate_token(name: str, scopes: Iterable[Scope | str]) -> tuple[str, TokenEntry]:
    """A new random token and its entry: ``(secret, entry)``. Only the entry is ever
    stored; the secret is for the caller to hand over once."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    entry = TokenEntry(name=name, sha256=hash_token(secret), scopes=frozenset(map(Scope, scopes)))
    return secret, entry


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for everything json.dumps
    # emits (it never writes "\/"), so this quotes any name or hash safely.
    return json.dumps(value)


def _render(entries: Sequence[TokenEntry], path: Path) -> str:
    if _is_json(path):
        return json.dumps({"tokens": [e.to_json() for e in entries]}, indent=2) + "\n"
    # Hand-written: the file is a flat list of three-key tables, not worth a TOML-writing
    # dependency (the standard library only reads TOML).
    lines = ["# fogline API tokens: SHA-256 hashes only, never the tokens themselves.", ""]
    for entry in entries:
        data = entry.to_json()
        lines.append("[[tokens]]")
        lines.append(f"name = {_toml_string(data['name'])}")
        lines.append(f"sha256 = {_toml_string(data['sha256'])}")
        lines.append(f"scopes = [{', '.join(_toml_string(s) for s in data['scopes'])}]")
        lines.append("")
    return "\n".join(lines)


def write_token_file(path: Path, entries: Sequence[TokenEntry]) -> None:
    """Write ``entries`` to ``path`` (TOML, or JSON for ``*.json``), replacing it atomically
    with a file only its owner can read or write (0600)."""
    TokenStore(entries)  # refuses duplicate names or hashes before anything is written
    text = _render(entries, path)
    directory = path.parent if str(path.parent) else Path()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_token(path: Path, entry: TokenEntry) -> None:
    """Append ``entry`` to the token file at ``path`` (created if missing); a name already
    in the file is refused with :class:`ConfigError`."""
    entries = _read_entries(path) if path.exists() else []
    if any(e.name == entry.name for e in entries):
        raise ConfigError(f"token file {path} already has a token named {entry.name!r}")
    write_token_file(path, [*entries, entry])
