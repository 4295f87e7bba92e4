#!/usr/bin/env python3
"""Make a development CA, a broker (server) certificate and site client certificates.

For trying the TLS listener of ``mosquitto.conf`` and for tests; production sites get their
certificates from the organisation's own CA. Needs only the ``cryptography`` package (installed
with ``fogline[edge]``), no ``openssl`` binary.

    python3 make-dev-certs.py --out /etc/mosquitto/certs \\
        --server-name broker.example.com --server-name 10.0.0.5 --client site-a

Writes ``ca.crt``/``ca.key``, ``server.crt``/``server.key`` and ``<client>.crt``/``<client>.key``
into ``--out``; private keys with mode 0600. Running it again reuses the CA and the server
certificate found there (re-issued only when ``--server-name`` is given), so it can add client
certificates for new sites later (``--client site-c``).
A client certificate's common name is the account name (a site id, or ``fogline-cloud`` for
workers): with ``use_identity_as_username`` the broker takes it as the MQTT username, which
the per-site ACL patterns (``%u``) use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A client name becomes a topic segment (through %u) and a file name: stricter than the
# topic rule (no '/', '+', '#'), so it is safe as both.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate, accepted by every TLS stack Mosquitto and paho use.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _load(out: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    crt, key = out / f"{stem}.crt", out / f"{stem}.key"
    if not (crt.exists() and key.exists()):
        return None
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{key} is not an EC private key")
    return x509.load_pem_x509_certificate(crt.read_bytes()), private


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    found = _load(out, "ca")
    if found is not None:
        return found
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fogline development CA")])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(out / "ca.key", key)
    _write_cert(out / "ca.crt", cert)
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    key: ec.EllipticCurvePrivateKey,
    alt_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    ca_cert, ca_key = ca
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _alt_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_server(
    out: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    names: list[str] | None,
    days: int,
) -> None:
    """The broker's certificate; clients check the name they dial against its alt names.

    An existing one is kept unless ``names`` asks for a re-issue (with the same key).
    """
    found = _load(out, "server")
    if found is not None and names is None:
        return
    names = names or list(DEFAULT_SERVER_NAMES)
    key = found[1] if found is not None else _key()
    cert = _leaf(
        ca, names[0], ExtendedKeyUsageOID.SERVER_AUTH, days, key, [_alt_name(n) for n in names]
    )
    _write_key(out / "server.key", key)
    _write_cert(out / "server.crt", cert)


def make_client(
    out: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], name: str, days: int
) -> None:
    """A client certificate whose common name is the site id (the MQTT username under mTLS)."""
    key = _key()
    cert = _leaf(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, days, key)
    _write_key(out / f"{name}.key", key)
    _write_cert(out / f"{name}.crt", cert)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the PEM files")
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name or IP address clients dial (repeat); (re)issues server.crt for them. "
        "Default for a new server.crt: localhost, 127.0.0.1, ::1",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        help="account (site id or fogline-cloud) to issue a client certificate for (repeat)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    args = parser.parse_args(argv)

    if args.days < 1:
        parser.error(f"--days must be at least 1, got {args.days}")
    for name in args.client:
        if name in ("ca", "server") or not _NAME_RE.match(name):
            parser.error(
                f"--client {name!r} must be a site id (letters, digits, '.', '_', '-'; "
                "at most 64) and not 'ca' or 'server'"
            )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(out, args.days)
    make_server(out, ca, args.server_name or None, args.days)
    for name in args.client:
        make_client(out, ca, name, args.days)
    issued = ", ".join(f"{n}.crt" for n in args.client) or "no client certificates"
    print(f"{out}: ca.crt, server.crt, {issued} (private keys *.key, mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
