"""Key files: created owner-only, never through a link or over another file; a key file
others can read is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fogline.sync import KeyRing, SigningKeyError, StorageError, generate_key, read_key, write_key
from fogline.sync._keys import write_private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_is_written_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = write_key(tmp_path / "k" / "a.pem", generate_key())
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_a_key_round_trips(tmp_path: Path) -> None:
    signer = generate_key()
    path = write_key(tmp_path / "a.pem", signer)
    assert read_key(path).public_key == signer.public_key


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "a.pem"
    path.write_text("keep me")
    with pytest.raises(StorageError, match="already exists"):
        write_key(path, generate_key())
    assert path.read_text() == "keep me"


def test_attack_a_symlink_planted_for_a_key_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere"
    (tmp_path / "a.pem").symlink_to(victim)
    with pytest.raises(StorageError):
        write_private_file(tmp_path / "a.pem", b"secret")
    assert not victim.exists()


def test_a_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "a.pem", generate_key())
    path.chmod(0o640)
    with pytest.raises(SigningKeyError, match="open to others"):
        read_key(path)


def test_a_file_that_is_not_a_key_is_refused_without_its_bytes(tmp_path: Path) -> None:
    path = write_private_file(tmp_path / "a.pem", b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n")
    with pytest.raises(SigningKeyError) as exc:
        read_key(path)
    assert "c2VjcmV0" not in str(exc.value)


def test_a_key_ring_hands_out_only_the_keys_a_root_lists(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    kept, stale = generate_key(), generate_key()
    ring.add("catalogue", "targets", kept)
    ring.add("catalogue", "targets", stale)
    assert len(ring.signers("catalogue", "targets")) == 2
    listed = ring.signers("catalogue", "targets", {kept.public_key.keyid})
    assert [s.public_key for s in listed] == [kept.public_key]
    assert ring.retire("catalogue", "targets", {kept.public_key.keyid}) == 1
    assert len(ring.signers("catalogue", "targets")) == 1
    assert ring.signers("director", "root") == []


def test_a_key_file_named_for_another_key_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    path = ring.add("catalogue", "targets", generate_key())
    path.rename(path.with_name("0" * 64 + ".pem"))
    with pytest.raises(SigningKeyError, match="holds key"):
        ring.signers("catalogue", "targets")
