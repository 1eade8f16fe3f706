"""Serving certificates: ``webhook.certs`` and ``ecr-webhook certs generate``.

Verification is a real TLS handshake (in memory, no socket) between the
server context the webhook serves with and a client configured like the
kube-apiserver: the CA bundle only, and names checked against the Subject
Alternative Names only (Go's crypto/x509 ignores the Common Name since Go 1.15).
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.serving import ConfigMapDir, ecr_webhook
from tests.test_security import client_ca_and_cert
from webhook import certs
from webhook.core.errors import ConfigError
from webhook.reload import CertificateHolder, server_context


def handshake(out: Path, name: str) -> str:
    """Complete a TLS handshake for ``name``; the negotiated version.  Raises SSLError."""
    server = server_context(str(out / "tls.crt"), str(out / "tls.key"))
    return pump(server, apiserver_client(out), name)


def apiserver_client(out: Path, client_pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client like the kube-apiserver; with ``client_pair``, presenting that certificate."""
    client = ssl.create_default_context(cafile=str(out / "ca.crt"))
    client.hostname_checks_common_name = False
    if client_pair is not None:
        client.load_cert_chain(*client_pair)
    return client


def pump(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str:
    """Run both sides of a handshake in memory; the negotiated version.  Raises SSLError
    (with a client CA, the server's refusal of the client's certificate)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for key, obj in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    version = c.version()
    assert version is not None
    return version


def generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ecr_webhook(), "certs", "generate", "--out-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_service_names() -> None:
    assert certs.service_names("ecr-webhook", "ecr-webhook") == [
        "ecr-webhook", "ecr-webhook.ecr-webhook", "ecr-webhook.ecr-webhook.svc",
        "ecr-webhook.ecr-webhook.svc.cluster.local",
    ]  # fmt: skip


def test_cli_writes_the_secret_files_with_sans(tmp_path: Path) -> None:
    result = generate(tmp_path, "--service", "ecr-webhook", "--namespace", "ecr-webhook",
                      "--dns", "localhost", "--ip", "127.0.0.1", "--ip", "::1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls.crt").stat().st_mode) == 0o644
    dns, ips = certs.sans_of((tmp_path / "tls.crt").read_bytes())
    assert dns == [*certs.service_names("ecr-webhook", "ecr-webhook"), "localhost"]
    assert ips == ["127.0.0.1", "::1"]
    for name in [*dns, "127.0.0.1"]:
        assert handshake(tmp_path, name) in ("TLSv1.2", "TLSv1.3")


def test_a_name_that_is_not_a_san_is_refused(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["ecr-webhook.ecr-webhook.svc"]), tmp_path)
    assert handshake(tmp_path, "ecr-webhook.ecr-webhook.svc")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(tmp_path, "ecr-webhook.other.svc")


def test_certificate_is_a_server_leaf_signed_by_the_ca(tmp_path: Path) -> None:
    bundle = certs.build_certificate(["a.example"], days=30)
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
    ca = x509.load_pem_x509_certificate(bundle.ca_pem)
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    remaining = bundle.not_after - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < remaining <= dt.timedelta(days=30)
    assert certs.not_after(bundle.cert_pem) == bundle.not_after.replace(microsecond=0)


def test_every_run_makes_a_new_pair(tmp_path: Path) -> None:
    assert generate(tmp_path, "--dns", "localhost").returncode == 0
    first = (tmp_path / "tls.crt").read_bytes()
    assert generate(tmp_path, "--dns", "localhost").returncode == 0
    assert (tmp_path / "tls.crt").read_bytes() != first
    assert handshake(tmp_path, "localhost")


@pytest.mark.parametrize(
    ("args", "needle"),
    [([], "at least one --dns name or --ip address"), (["--ip", "300.1.1.1"], "--ip")],
    ids=["no-names", "bad-ip"],
)
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    result = generate(tmp_path / "out", *args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError):
        certs.build_certificate([], [])


def test_server_context_is_tls_1_2_minimum(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    ctx = server_context(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_holder_reloads_changed_files_and_keeps_the_last_good_pair(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    events: list[str] = []
    holder = CertificateHolder(
        str(tmp_path / "tls.crt"),
        str(tmp_path / "tls.key"),
        on_reload=lambda result, err: events.append(result),
    )
    first = holder.context()
    assert holder.context() is first  # unchanged files: the cached context
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    second = holder.context()
    assert second is not first
    assert events == ["success"]
    # A key that does not match: the previous context stays, reported once.
    (tmp_path / "tls.key").write_bytes(certs.build_certificate(["x"]).key_pem)
    assert holder.context() is second
    assert holder.context() is second
    assert events == ["success", "failure"]
    assert holder.problem() is None


def test_holder_reloads_a_changed_client_ca_alone(tmp_path: Path) -> None:
    """A Secret update of the client CA only (symlink swap): the next connection
    trusts the new CA and no longer the old one; the pair files did not change."""
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    ca_a, *pair_a = client_ca_and_cert(tmp_path, "a")
    ca_b, *pair_b = client_ca_and_cert(tmp_path, "b")
    client_a = apiserver_client(tmp_path, (pair_a[0], pair_a[1]))
    client_b = apiserver_client(tmp_path, (pair_b[0], pair_b[1]))
    volume = ConfigMapDir(tmp_path / "client-ca", key="ca.crt")
    volume.update(ca_a.read_text())
    events: list[str] = []
    holder = CertificateHolder(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"),
                               client_ca=str(volume.path),
                               on_reload=lambda result, err: events.append(result))  # fmt: skip
    first = holder.context()
    assert pump(first, client_a, "localhost")
    with pytest.raises(ssl.SSLError):
        pump(first, client_b, "localhost")
    assert holder.context() is first

    volume.update(ca_b.read_text())
    second = holder.context()
    assert second is not first
    assert events == ["success"]
    assert pump(second, client_b, "localhost")
    with pytest.raises(ssl.SSLError):
        pump(second, client_a, "localhost")
    # The context of connections accepted before the change is untouched.
    assert pump(first, client_a, "localhost")

    # Rewritten in place (not a symlink swap) is seen too.
    (volume.root / "..data" / "ca.crt").write_text(ca_a.read_text() + ca_b.read_text())
    third = holder.context()
    assert third is not second and events == ["success", "success"]
    assert pump(third, client_a, "localhost") and pump(third, client_b, "localhost")


@pytest.mark.parametrize("damage", ["not PEM", "a broken PEM block", "empty", "deleted"])
def test_a_garbage_client_ca_keeps_the_last_good_context(tmp_path: Path, damage: str) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    ca_a, *pair_a = client_ca_and_cert(tmp_path, "a")
    ca_b, *_ = client_ca_and_cert(tmp_path, "b")
    client_a = apiserver_client(tmp_path, (pair_a[0], pair_a[1]))
    volume = ConfigMapDir(tmp_path / "client-ca", key="ca.crt")
    volume.update(ca_a.read_text())
    errors: list[BaseException | None] = []
    holder = CertificateHolder(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"),
                               client_ca=str(volume.path),
                               on_reload=lambda result, err: errors.append(err))  # fmt: skip
    good = holder.context()
    if damage == "deleted":
        volume.path.unlink()
    else:
        volume.update({"not PEM": "\x00garbage\n" * 20,
                       "a broken PEM block": "-----BEGIN CERTIFICATE-----\nnot base64\n",
                       "empty": ""}[damage])  # fmt: skip
    for _ in range(3):  # every new connection asks; reported once per change
        assert holder.context() is good
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert f"--client-ca {volume.path}" in str(errors[0])
    assert holder.problem() is None  # still serving, with the last good CA
    assert pump(holder.context(), client_a, "localhost")
    # A good file again is taken at the next connection.
    volume.update(ca_b.read_text())  # (re-creates the key's link if it was deleted)
    assert holder.context() is not good
    assert errors[1:] == [None]
    with pytest.raises(ssl.SSLError):
        pump(holder.context(), client_a, "localhost")
