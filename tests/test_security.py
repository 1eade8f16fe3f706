"""Security of the admission server (issue 11, item 6).

* ``serve --client-ca``: a client whose certificate that CA signed is served;
  one without a certificate, or with one from another CA, is refused at the
  handshake.  The real server over TLS on loopback.
* No credential in any log or audit record: a server at the highest
  verbosity, with AWS credentials in its environment, is sent admissions that
  carry a bearer token in ``Authorization``, in ``userInfo.extra``, in a pod's
  env and annotations, and requests it rejects; its stderr and audit file are
  then searched for every secret.
* A private key readable by every user is refused at start.
* ``bandit`` over ``webhook/``: no finding left unjustified.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.serving import (
    REGION,
    ConfigMapDir,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    aws_node_pod,
    ecr_webhook,
    free_port,
    get,
    post_review,
)
from tests.test_server import metrics, sample
from webhook import certs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def client_ca_and_cert(out: Path, prefix: str) -> tuple[Path, Path, Path]:
    """A CA, and a client certificate it signed (clientAuth), as the apiserver would hold."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{prefix}-ca"))
          .issuer_name(_name(f"{prefix}-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("kube-apiserver"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = out / f"{prefix}-ca.crt", out / f"{prefix}.crt", out / f"{prefix}.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    paths[2].chmod(0o600)
    return paths


def start(tmp: Path, *extra: str, env: dict[str, str] | None = None,
          metrics_port: int | None = None) -> tuple[ServerProcess, int]:  # fmt: skip
    port = free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port or free_port()), "--cert-file", str(tmp / "tls.crt"),
            "--key-file", str(tmp / "tls.key"), "--region", REGION,
            "--audit-log", str(tmp / "audit.log"), "--workers", "1", "--threads", "2",
            *extra]  # fmt: skip
    return ServerProcess(argv, env=env, stderr=tmp / "stderr.log"), port


# --------------------------------------------------------------------- client certificates


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    tmp = tmp_path_factory.mktemp("mtls")
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    ca, _, _ = client_ca_and_cert(tmp, "apiserver")
    client_ca_and_cert(tmp, "stranger")
    proc, port = start(tmp, "--client-ca", str(ca))
    ctx = apiserver_tls_context(tmp / "ca.crt")
    ctx.load_cert_chain(tmp / "apiserver.crt", tmp / "apiserver.key")
    try:
        proc.wait_ready(port, ctx)
        yield tmp, port
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_a_client_certificate_signed_by_the_client_ca_is_served(mtls: tuple[Path, int]) -> None:
    tmp, port = mtls
    ctx = apiserver_tls_context(tmp / "ca.crt")
    ctx.load_cert_chain(tmp / "apiserver.crt", tmp / "apiserver.key")
    status, doc = post_review(port, ctx, admission_review(uid="mtls"))
    assert status == 200 and doc["response"]["uid"] == "mtls"


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
@pytest.mark.parametrize("tls", ["TLSv1_2", "TLSv1_3"])
def test_a_client_without_a_trusted_certificate_is_refused_at_the_handshake(
    mtls: tuple[Path, int], who: str, tls: str
) -> None:
    tmp, port = mtls
    ctx = apiserver_tls_context(tmp / "ca.crt")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[tls]
    if who == "another CA":
        ctx.load_cert_chain(tmp / "stranger.crt", tmp / "stranger.key")
    assert_refused(port, ctx)


def assert_refused(port: int, ctx: ssl.SSLContext) -> None:
    """The server refuses ``ctx``'s client at the handshake: no HTTP answer."""
    body = json.dumps(admission_review()).encode()
    request = (b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    # TLS 1.2: the handshake itself fails.  TLS 1.3: the client's side of the
    # handshake completes before the server has checked the certificate; the
    # server's alert arrives on the first read.  Either way no HTTP answer.
    refused = (ssl.SSLError, ConnectionResetError, BrokenPipeError)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises(refused) as info, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:  # fmt: skip
        s.sendall(request)
        data = s.recv(4096)
        assert not data.startswith(b"HTTP/"), data
        raise ConnectionResetError("closed without an answer")  # EOF: refused too
    text = str(info.value)
    assert "HTTP/" not in text


def test_a_new_client_ca_file_applies_to_new_connections(tmp_path: Path) -> None:
    """The client CA Secret updated (symlink swap) while serving: the next
    connection is judged by the new CA, with no restart; a garbage CA file keeps
    the last good one and is counted like a garbage certificate."""
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp_path)
    ca_a, *_ = client_ca_and_cert(tmp_path, "apiserver")
    ca_b, *_ = client_ca_and_cert(tmp_path, "stranger")
    a, b = (apiserver_tls_context(tmp_path / "ca.crt") for _ in range(2))
    a.load_cert_chain(tmp_path / "apiserver.crt", tmp_path / "apiserver.key")
    b.load_cert_chain(tmp_path / "stranger.crt", tmp_path / "stranger.key")
    volume = ConfigMapDir(tmp_path / "client-ca", key="ca.crt")
    volume.update(ca_a.read_text())
    metrics_port = free_port()
    proc, port = start(tmp_path, "--client-ca", str(volume.path), metrics_port=metrics_port)

    def count(name: str, **labels: str) -> float:
        return sample(metrics(metrics_port), name, **labels)

    try:
        proc.wait_ready(port, a)
        assert post_review(port, a, admission_review())[0] == 200
        assert_refused(port, b)

        volume.update(ca_b.read_text())
        status, doc = post_review(port, b, admission_review(uid="after-swap"))
        assert status == 200 and doc["response"]["uid"] == "after-swap"
        assert_refused(port, a)
        assert count("ecr_webhook_certificate_reloads_total", result="success") == 1

        errors = count("ecr_webhook_errors_total", stage="certificate")
        volume.update("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        for _ in range(3):  # new connections: still CA-B, reported once
            assert post_review(port, b, admission_review())[0] == 200
            assert_refused(port, a)
        assert count("ecr_webhook_certificate_reloads_total", result="failure") == 1
        assert count("ecr_webhook_errors_total", stage="certificate") == errors + 1
        assert get(port, "/readyz", b)[0] == 200
    finally:
        assert proc.stop() == 0, proc.stderr()
    rejected = [json.loads(ln) for ln in (tmp_path / "stderr.log").read_text().splitlines()
                if "serving certificate rejected" in ln]  # fmt: skip
    assert len(rejected) == 1 and f"--client-ca {volume.path}" in rejected[0]["err"]
    assert rejected[0]["clientCa"] == str(volume.path)


def test_a_missing_client_ca_file_is_one_line_at_start(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    result = subprocess.run([*ecr_webhook(), "serve", "--cert-file", str(tmp_path / "tls.crt"),
                             "--key-file", str(tmp_path / "tls.key"), "--client-ca", "nope.pem",
                             "--port", str(free_port()), "--metrics-port", str(free_port())],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "--client-ca nope.pem" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------- no secrets in logs

BEARER = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLXRoYXQtbXVzdC1ub3QtbGVhaw.sig"
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKENdontlogme"
SECRETS = (BEARER, AWS_KEY_ID, AWS_SECRET, SESSION_TOKEN)


def test_no_credential_reaches_a_log_or_an_audit_record(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp_path)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET,
               AWS_SESSION_TOKEN=SESSION_TOKEN)  # fmt: skip
    proc, port = start(tmp_path, "-v", "9", env=env)
    ctx = apiserver_tls_context(tmp_path / "ca.crt")
    try:
        proc.wait_ready(port, ctx)
        pod = aws_node_pod()
        pod["metadata"]["annotations"] = {"token": BEARER}
        pod["spec"]["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY",
                                                    "value": AWS_SECRET})  # fmt: skip
        review = admission_review(pod, uid="secrets")
        review["request"]["userInfo"]["extra"] = {"authentication.kubernetes.io/credential-id":
                                                  [f"JTI={SESSION_TOKEN}"]}  # fmt: skip
        body = json.dumps(review).encode()
        headers = (b"Authorization: Bearer " + BEARER.encode() + b"\r\n"
                   b"X-Amz-Security-Token: " + SESSION_TOKEN.encode() + b"\r\n")  # fmt: skip
        for payload, ctype in ((body, b"application/json"), (body, b"text/plain"),
                               (body[:-5], b"application/json")):  # fmt: skip
            framing = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
            request = (b"POST /mutate?token=" + BEARER.encode()
                       + b" HTTP/1.1\r\nHost: localhost\r\n" + headers
                       + b"Content-Type: " + ctype + b"\r\n" + framing + payload)  # fmt: skip
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request)
                assert s.recv(64).startswith(b"HTTP/1.1 ")
        assert post_review(port, ctx, admission_review(uid="after"))[0] == 200
        assert get(port, "/healthz", ctx)[0] == 200
    finally:
        assert proc.stop() == 0, proc.stderr()
    stderr = (tmp_path / "stderr.log").read_text()
    audit = (tmp_path / "audit.log").read_text()
    assert '"auditID":"secrets"' in audit  # the records are there to search
    assert '"v":' in stderr
    for secret in SECRETS:
        assert secret not in stderr, secret
        assert secret not in audit, secret
    assert "Authorization" not in stderr and "Bearer" not in audit


# --------------------------------------------------------------------- key file mode


def test_a_private_key_readable_by_everyone_is_refused_at_start(tmp_path: Path) -> None:
    certs.write_bundle(certs.build_certificate(["localhost"]), tmp_path)
    (tmp_path / "tls.key").chmod(0o644)
    argv = [*ecr_webhook(), "serve", "--cert-file", str(tmp_path / "tls.crt"),
            "--key-file", str(tmp_path / "tls.key"), "--port", str(free_port()),
            "--metrics-port", str(free_port())]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "mode 0644" in result.stderr and "chmod 600" in result.stderr
    (tmp_path / "tls.key").chmod(0o440)  # the Secret volume's defaultMode: accepted
    proc = ServerProcess(argv, stderr=tmp_path / "stderr.log")
    try:
        proc.wait_ready(int(argv[argv.index("--port") + 1]),
                        apiserver_tls_context(tmp_path / "ca.crt"))  # fmt: skip
    finally:
        assert proc.stop() == 0


# --------------------------------------------------------------------- bandit


def test_bandit_finds_nothing_unjustified_in_the_package() -> None:
    """Every remaining finding carries ``# nosec <test id>`` with its reason on the line."""
    exe = shutil.which("bandit", path=str(Path(sys.executable).parent)) or shutil.which("bandit")
    assert exe, "bandit is in the test extra (pip install -e '.[test]')"
    result = subprocess.run([exe, "-q", "-r", "webhook", "-f", "json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    report = json.loads(result.stdout)
    assert report["results"] == [], [
        (r["filename"], r["line_number"], r["test_id"], r["issue_text"]) for r in report["results"]
    ]
    assert report["metrics"]["_totals"]["loc"] > 1000  # it did scan the package


# --------------------------------------------------------------------- RBAC reasons


def test_every_rbac_rule_states_the_reason_for_each_of_its_verbs() -> None:
    """Least privilege is asserted by tests/test_manifests.py; here, each rule in the
    source carries a comment right above it that names every verb it grants."""
    import yaml

    text = (ROOT / "manifests/components/self-signed/rbac.yaml").read_text()
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    granted = [r for doc in yaml.safe_load_all(text) for r in doc.get("rules", [])]
    assert len(rules) == len(granted) >= 3
    for start, rule in zip(rules, granted, strict=True):
        comment = []
        i = start - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.append(lines[i])
            i -= 1
        reason = " ".join(comment)
        assert comment, f"no reason above line {start + 1}"
        for verb in rule["verbs"]:
            assert verb in reason, (verb, reason)
