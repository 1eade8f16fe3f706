"""Serving certificates for the webhook, built with ``cryptography``.

``build_certificate`` is pure (it returns PEM bytes); ``write_bundle`` writes the
files with the names of a Kubernetes TLS Secret (``ca.crt``, ``tls.crt``,
``tls.key``), the key with mode 0600.

The kube-apiserver's Go TLS stack verifies the webhook's certificate by its
Subject Alternative Names only; the Common Name is ignored since Go 1.15
(``x509: certificate relies on legacy Common Name field``).  So every name the
apiserver may dial (``svc``, ``svc.ns``, ``svc.ns.svc``, ...) must be a SAN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook.core.errors import ConfigError

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
# RFC 1123 host names, plus a leading "*." wildcard label.
_DNS_NAME = re.compile(
    r"^(\*\.)?(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
DEFAULT_VALIDITY_DAYS = 365


@dataclass(frozen=True)
class Bundle:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime


def service_names(service: str, namespace: str) -> list[str]:
    """The DNS names a Service is reached by from the apiserver."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def build_certificate(
    dns_names: Sequence[str],
    ips: Sequence[str] = (),
    *,
    days: int = DEFAULT_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> Bundle:
    """A fresh CA and a serving certificate signed by it, for ``dns_names`` and ``ips``."""
    if not dns_names and not ips:
        raise ConfigError("a certificate needs at least one --dns name or --ip address")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise ConfigError(f"--ip: {exc}") from None
    now = now or dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)  # tolerate clock skew
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("ecr-webhook-ca")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    for n in dns_names:
        if not n or not n.isascii() or not _DNS_NAME.match(n):
            raise ConfigError(
                f"--dns {n!r}: not a DNS name (letters, digits, '-', '.'; IDNs in their xn-- form)"
            )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        # A fixed short CN: X.509 caps it at 64 characters and the apiserver
        # reads only the SANs anyway.
        .subject_name(_name("ecr-webhook"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Bundle(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        not_after=not_after,
    )


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bundle(bundle: Bundle, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``ca.crt``, ``tls.crt`` (0644) and ``tls.key`` (0600) atomically."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {n: out / n for n in (CA_FILE, CERT_FILE, KEY_FILE)}
        _atomic_write(paths[KEY_FILE], bundle.key_pem, 0o600)
        _atomic_write(paths[CERT_FILE], bundle.cert_pem, 0o644)
        _atomic_write(paths[CA_FILE], bundle.ca_pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"--out-dir {out}: cannot write certificates: {exc.strerror}") from None
    return paths


def not_after(cert_pem: bytes) -> dt.datetime:
    """Expiry of the first certificate in ``cert_pem``."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def sans_of(cert_pem: bytes) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ext.get_values_for_type(x509.DNSName), [
        str(a) for a in ext.get_values_for_type(x509.IPAddress)
    ]
