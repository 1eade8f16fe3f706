"""Real registries, moto and fault stand-ins for the availability-probing tests.

Issue 8 ("Tests with real parts") and issue 11 (faults).  What is real here:

- ``Registry``: Debian's ``docker-registry`` (CNCF Distribution 2.8) on
  127.0.0.1 with TLS (a test CA from ``CertAuthority``) and htpasswd auth
  (bcrypt, made by ``htpasswd -B`` from apache2-utils: Distribution accepts
  only bcrypt entries, ``registry/auth/htpasswd/htpasswd.go``).  Images are
  pushed through the registry HTTP API (OCI distribution spec: blob upload
  POST then PUT, then PUT manifest).  Manifest requests are counted from the
  registry's own access log (Apache combined format, written on stdout by
  Distribution's ``gorilla/handlers.CombinedLoggingHandler``).
- ``MotoServer``: moto in server mode, reached through boto3's standard
  ``AWS_ENDPOINT_URL_ECR``.  moto's ``GetAuthorizationToken`` answers
  ``base64("AWS:<registryId>-auth-token")`` with ``expiresAt`` fixed at
  2015-01-01 (``moto/ecr/models.py``): the same token in every region and on
  every call, always already expired.  ``ecr_token`` discovers it at run time
  rather than trusting that description.

What is a stand-in (a real registry or a real ECR API cannot be made to do it
on demand), each class says so in its docstring: ``HungServer``, ``ResetServer``,
``closed_port_url``, ``FaultRegistry`` (5xx / 429), ``EcrApiStandIn`` (token
call failing, throttled, or with a chosen ``expiresAt``).  The expired-TLS
registry is the real ``docker-registry`` serving a certificate whose validity
has ended (``CertAuthority.issue(expired=True)``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.serving import wait_until  # noqa: F401  (re-exported for the probing tests)

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"

# The Accept list an ECR client sends for a manifest HEAD (issue 8, item 1): OCI
# index and manifest, Docker manifest list and v2 manifest.  Without a Docker/OCI
# type Distribution would try to convert to schema 1 (and fail for OCI).
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# The EKS image account of most commercial regions
# (https://docs.aws.amazon.com/eks/latest/userguide/add-ons-images.html).
EKS_ACCOUNT = "602401143452"

FAKE_AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key id
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def eks_registry_host(region: str, account: str = EKS_ACCOUNT) -> str:
    """The ECR registry host of ``account`` in ``region`` (commercial partition)."""
    return f"{account}.dkr.ecr.{region}.amazonaws.com"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (bind 0, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    """Stand-in for a registry that is down: a loopback port with no listener.

    The kernel answers the SYN with RST, so a client sees "connection refused"
    at once, as it does for a registry whose host is up but whose service is not.
    """
    return f"https://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])



def terminate(process: subprocess.Popen[Any]) -> None:
    """SIGTERM (Distribution and moto_server drain and exit), SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

class CertAuthority:
    """One test CA whose file clients pass as ``--registry-ca``; it signs every
    registry's certificate, so the expired one fails on expiry, not on trust."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = _name("ecr-webhook test registry CA")
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        self.ca_file = self.directory / "registry-ca.crt"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for 127.0.0.1 and localhost: (cert file, key file).

        ``expired``: valid from 10 days ago until yesterday.
        """
        now = dt.datetime.now(dt.UTC)
        if expired:
            not_before, not_after = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
        else:
            not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=2)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name[:64]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        cert_file = self.directory / f"{name}.crt"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        key_file.chmod(0o600)
        return cert_file, key_file

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self, name: str, *, expired: bool = False) -> ssl.SSLContext:
        """A server context with a fresh certificate from this CA."""
        cert_file, key_file = self.issue(name, expired=expired)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert_file), str(key_file))
        return ctx


def basic_auth(user: str, password: str) -> str:
    """The value of an ``Authorization: Basic`` header."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ HTTP helpers


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (lower-case names), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def https_request(
    url: str,
    method: str,
    path: str,
    *,
    context: ssl.SSLContext,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One request on a fresh connection to ``url`` (``https://host:port``)."""
    host, _, port = url.removeprefix("https://").partition(":")
    conn = http.client.HTTPSConnection(host, int(port or 443), context=context, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


# ---------------------------------------------------------------- the registry


_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/?]+)")


@dataclass(frozen=True)
class AccessRecord:
    """One line of the registry's access log."""

    method: str
    path: str
    status: int


@dataclass
class Registry:
    """Debian's ``docker-registry`` (CNCF Distribution) on 127.0.0.1 with TLS and htpasswd.

    ``users`` maps user name to password; the htpasswd file holds their bcrypt
    hashes.  ``expired_cert`` serves a certificate from the same CA whose
    validity ended yesterday (the real registry, only the certificate is bad).
    """

    name: str
    ca: CertAuthority
    workdir: Path
    users: Mapping[str, str]
    expired_cert: bool = False
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    _log: list[AccessRecord] = field(default_factory=list)
    _log_lock: threading.Lock = field(default_factory=threading.Lock)
    _stderr_path: Path | None = None

    @property
    def url(self) -> str:
        """The base URL, in the form ``--registry-endpoint HOST=URL`` takes."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def credentials(self) -> tuple[str, str]:
        """The first (user, password) of ``users``."""
        user = next(iter(self.users))
        return user, self.users[user]

    def start(self, timeout: float = 30.0) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        htpasswd = self.workdir / "htpasswd"
        lines = []
        for user, password in self.users.items():
            out = subprocess.run(
                [HTPASSWD, "-nbB", "-C", "5", user, password],
                check=True, capture_output=True, text=True,
            )
            lines.append(out.stdout.strip())
        htpasswd.write_text("\n".join(lines) + "\n")
        cert_file, key_file = self.ca.issue(f"registry-{self.name}", expired=self.expired_cert)
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        for _attempt in range(5):
            self.port = free_port()
            config = {
                "version": 0.1,
                "log": {"level": "error", "formatter": "text",
                        "accesslog": {"disabled": False}},
                "storage": {"filesystem": {"rootdirectory": str(storage)},
                            "delete": {"enabled": True}},
                "auth": {"htpasswd": {"realm": f"{self.name}-realm", "path": str(htpasswd)}},
                "http": {"addr": f"127.0.0.1:{self.port}",
                         "tls": {"certificate": str(cert_file), "key": str(key_file)}},
            }  # fmt: skip
            config_file = self.workdir / "config.yml"
            # JSON is YAML: Distribution reads it with its YAML parser.
            config_file.write_text(json.dumps(config, indent=2))
            self._stderr_path = self.workdir / "stderr.log"
            self.process = subprocess.Popen(
                [DOCKER_REGISTRY, "serve", str(config_file)],
                stdout=subprocess.PIPE,
                stderr=self._stderr_path.open("wb"),
                start_new_session=True,
            )
            threading.Thread(target=self._read_access_log, args=(self.process,),
                             daemon=True).start()
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise AssertionError(f"docker-registry {self.name} did not start: {self.stderr()}")

    def set_users(self, users: Mapping[str, str]) -> None:
        """Replace the htpasswd file (atomically).  Distribution 2.8 re-reads it when
        its mtime changes (registry/auth/htpasswd/access.go), so this rotates the
        credentials of a running registry: how a test makes it refuse a token."""
        lines = [subprocess.run([HTPASSWD, "-nbB", "-C", "5", user, password], check=True,
                                capture_output=True, text=True).stdout.strip()
                 for user, password in users.items()]  # fmt: skip
        path = self.workdir / "htpasswd"
        old = path.stat().st_mtime_ns if path.exists() else 0
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.utime(tmp, ns=(max(time.time_ns(), old + 1_000_000_000),) * 2)
        os.replace(tmp, path)
        self.users = dict(users)

    def _wait_ready(self, timeout: float) -> bool:
        ctx = self._context()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                answer = https_request(self.url, "GET", "/v2/", context=ctx, timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            # 401 with a Basic challenge: up, and auth is on.
            return answer.status == 401
        return False

    def _read_access_log(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            m = _ACCESS_LINE.search(raw.decode("utf-8", "replace"))
            if m:
                with self._log_lock:
                    self._log.append(AccessRecord(m["method"], m["path"], int(m["status"])))

    def stderr(self) -> str:
        if self._stderr_path and self._stderr_path.exists():
            return self._stderr_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        """SIGTERM (Distribution drains and exits), SIGKILL after 10 s."""
        if self.process is None:
            return
        terminate(self.process)
        if self.process.stdout:
            self.process.stdout.close()
        self.process = None

    # -- what it received

    def access_log(self) -> list[AccessRecord]:
        with self._log_lock:
            return list(self._log)

    def manifest_requests(
        self, repository: str | None = None, reference: str | None = None
    ) -> list[AccessRecord]:
        """HEAD and GET requests for manifests received so far (any status).

        The access log line is written when the answer is complete, so count
        after the client has its answer, or with ``settled_manifest_count``.
        """
        out = []
        for rec in self.access_log():
            m = _MANIFEST_PATH.match(rec.path)
            if rec.method not in ("HEAD", "GET") or not m:
                continue
            if repository is not None and m["repo"] != repository:
                continue
            if reference is not None and m["ref"] != reference:
                continue
            out.append(rec)
        return out

    def settled_manifest_count(
        self, repository: str | None = None, reference: str | None = None, quiet: float = 0.5
    ) -> int:
        """The manifest request count once it has not changed for ``quiet`` seconds."""
        last = -1
        stable_since = time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = len(self.manifest_requests(repository, reference))
            if n != last:
                last, stable_since = n, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                return n
            time.sleep(0.05)
        return last

    # -- pushing

    def _context(self) -> ssl.SSLContext:
        ctx = self.ca.client_context()
        if self.expired_cert:
            # Only the fixture itself talks past the expired certificate (to push).
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _auth(self) -> dict[str, str]:
        return {"Authorization": basic_auth(*self.credentials())}

    def _push_blob(self, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = https_request(self.url, "POST", f"/v2/{repository}/blobs/uploads/",
                              context=self._context(), headers=self._auth())
        if start.status != 202:
            raise AssertionError(f"{self.name}: blob upload start {start.status} {start.body!r}")
        location = start.headers["location"]
        if location.startswith("https://"):
            location = "/" + location.split("/", 3)[3]
        sep = "&" if "?" in location else "?"
        put = https_request(
            self.url, "PUT", f"{location}{sep}digest={digest}", context=self._context(),
            headers={**self._auth(), "Content-Type": "application/octet-stream",
                     "Content-Length": str(len(data))},
            body=data,
        )  # fmt: skip
        if put.status != 201:
            raise AssertionError(f"{self.name}: blob upload {put.status} {put.body!r}")
        return digest

    def push_image(self, repository: str, tag: str) -> str:
        """Push a small valid OCI image (config + one gzip layer); its manifest digest.

        The layer holds one file naming the repository and tag, so every
        (repository, tag) has its own digest.
        """
        layer = _layer_tar_gz(f"{repository}:{tag}\n".encode())
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/image-id"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }, sort_keys=True).encode()  # fmt: skip
        layer_digest = self._push_blob(repository, layer)
        config_digest = self._push_blob(repository, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        }, sort_keys=True).encode()  # fmt: skip
        put = https_request(
            self.url, "PUT", f"/v2/{repository}/manifests/{tag}", context=self._context(),
            headers={**self._auth(), "Content-Type": OCI_MANIFEST}, body=manifest,
        )  # fmt: skip
        if put.status != 201:
            raise AssertionError(f"{self.name}: manifest PUT {put.status} {put.body!r}")
        digest = put.headers.get("docker-content-digest", "")
        expected = "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert digest == expected, (digest, expected)
        self.digests[(repository, tag)] = digest
        return digest

    def head_manifest(
        self, repository: str, reference: str, *, authorization: str | None = None,
        timeout: float = 10.0, context: ssl.SSLContext | None = None,
    ) -> Answer:
        """``HEAD /v2/<repository>/manifests/<reference>`` as an ECR client sends it
        (verifying TLS against the test CA unless ``context`` says otherwise)."""
        headers = {"Accept": MANIFEST_ACCEPT}
        if authorization:
            headers["Authorization"] = authorization
        return https_request(self.url, "HEAD", f"/v2/{repository}/manifests/{reference}",
                             context=context or self.ca.client_context(), headers=headers,
                             timeout=timeout)


def push_image(registry: Registry, repository: str, tag: str) -> str:
    """Push a small OCI image to ``registry`` as ``repository:tag``; its manifest digest."""
    return registry.push_image(repository, tag)


def _layer_tar_gz(content: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("image-id")
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


# ------------------------------------------------------------------------ moto


def aws_env(ecr_endpoint: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess (CLI, server) that must reach ``ecr_endpoint``.

    Fake static credentials (moto accepts any), no shared config or credentials
    files and no IMDS, so boto3's default chain resolves to the fake keys and
    never leaves the machine.
    """
    env = dict(os.environ if base is None else base)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    env.update({
        "AWS_ENDPOINT_URL_ECR": ecr_endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_AWS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    })  # fmt: skip
    return env


@dataclass(frozen=True)
class EcrToken:
    """What ``GetAuthorizationToken`` answered, decoded."""

    user: str
    password: str
    expires_at: dt.datetime
    proxy_endpoint: str


def ecr_token(endpoint: str, region: str, registry_ids: list[str] | None = None) -> EcrToken:
    """Call ``ecr.get_authorization_token`` at ``endpoint`` in ``region`` with boto3."""
    import boto3

    client = boto3.client(
        "ecr", region_name=region, endpoint_url=endpoint,
        aws_access_key_id=FAKE_AWS_KEY, aws_secret_access_key=FAKE_AWS_SECRET,
    )  # fmt: skip
    kwargs: dict[str, Any] = {"registryIds": registry_ids} if registry_ids else {}
    data = client.get_authorization_token(**kwargs)["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return EcrToken(user, password, data["expiresAt"], data["proxyEndpoint"])


@dataclass
class MotoServer:
    """moto in server mode (``moto_server``) on a free loopback port."""

    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MotoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        for _attempt in range(5):
            self.port = free_port()
            log = (self.workdir / "moto.log").open("wb")
            self.process = subprocess.Popen(
                [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=aws_env(f"http://127.0.0.1:{self.port}"),
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    conn.request("GET", "/moto-api/")
                    conn.getresponse().read()
                    conn.close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise AssertionError("moto_server did not start: " +
                             (self.workdir / "moto.log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process)
        self.process = None


# --------------------------------------------------------- fault stand-ins


class _Counting:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def bump(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


class HungServer(_Counting):
    """Stand-in for a hung registry: accepts TCP connections and never answers.

    A real Distribution cannot be made to hang on demand.  The kernel completes
    the TCP handshake (the listening socket's backlog), this server accepts and
    holds each connection, reads nothing and sends nothing: a TLS client waits
    for the ServerHello until its own timeout.  ``count`` is connections accepted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.bump()
            self._held.append(conn)

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in self._held:
            c.close()


class ResetServer(_Counting):
    """Stand-in for a registry (or a middlebox) that resets connections.

    Accepts, reads the first bytes (the TLS ClientHello), then closes with
    ``SO_LINGER`` 0, which makes the kernel send RST: the client sees
    "connection reset by peer" during the handshake.  ``count`` is connections.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.bump()
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(4096)
            # struct linger {l_onoff=1, l_linger=0}: close() sends RST.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class _ThreadingTLSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class FaultRegistry(_Counting):
    """Stand-in for a registry answering every request with ``status`` (5xx, 429).

    Distribution answers 5xx only when its storage fails and never rate-limits,
    so a small TLS HTTP server (same CA as the real registries) plays the part.
    It answers like Distribution would: the ``Docker-Distribution-Api-Version``
    header, a JSON ``errors`` body, and ``Retry-After`` on 429 (RFC 6585).
    ``count`` is requests received; ``requests`` lists (method, path).
    """

    def __init__(self, ca: CertAuthority, status: int, name: str | None = None) -> None:
        super().__init__()
        self.status = status
        self.requests: list[tuple[str, str]] = []
        fault = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                fault.bump()
                fault.requests.append((self.command, self.path))
                code = {429: "TOOMANYREQUESTS"}.get(fault.status, "UNKNOWN")
                body = json.dumps({"errors": [{"code": code, "message": "stand-in fault",
                                               "detail": None}]}).encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
                if fault.status == 429:
                    self.send_header("Retry-After", "30")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _ThreadingTLSServer(("127.0.0.1", 0), Handler)
        ctx = ca.server_context(name or f"fault-{status}")
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


ECR_TARGET_PREFIX = "AmazonEC2ContainerRegistry_V20150921."


class EcrApiStandIn(_Counting):
    """Stand-in for the ECR API where moto cannot play the fault.

    moto never throttles, never fails and always answers ``expiresAt``
    2015-01-01.  This plain-HTTP server speaks the ECR JSON 1.1 protocol
    (``X-Amz-Target: AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken``)
    for ``GetAuthorizationToken`` only; point ``AWS_ENDPOINT_URL_ECR`` at ``url``.

    ``mode``:
    - ``"ok"``: a token ``base64("AWS:<password>")`` with ``expiresAt`` =
      now + ``expires_in`` seconds (negative: already expired);
    - ``"throttle"``: HTTP 400 ``ThrottlingException`` (what ECR answers when
      the account's GetAuthorizationToken rate is exceeded; botocore retries it);
    - ``"fail"``: HTTP 500 ``ServerException``;
    - ``"deny"``: HTTP 400 ``AccessDeniedException`` (the identity may not call it).

    ``count`` is GetAuthorizationToken calls received (retries included);
    ``mode``, ``password`` and ``expires_in`` may be changed while running.
    ``first_passwords`` are handed out, one per call, before ``password`` (a token
    the registry will refuse, then a good one: a token revoked before its expiry).
    """

    def __init__(self, mode: str = "ok", password: str = "", expires_in: float = 12 * 3600):
        super().__init__()
        self.mode = mode
        self.password = password
        self.first_passwords: list[str] = []
        self.expires_in = expires_in
        self.targets: list[str] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                target = self.headers.get("X-Amz-Target", "")
                api.targets.append(target)
                if target != ECR_TARGET_PREFIX + "GetAuthorizationToken":
                    self._send(400, {"__type": "UnknownOperationException",
                                     "message": f"stand-in serves only GetAuthorizationToken, "
                                                f"not {target}"})
                    return
                api.bump()
                if api.mode == "throttle":
                    self._send(400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
                elif api.mode == "fail":
                    self._send(500, {"__type": "ServerException",
                                     "message": "stand-in internal failure"})
                elif api.mode == "deny":
                    self._send(400, {"__type": "AccessDeniedException",
                                     "message": "User is not authorized to perform: "
                                                "ecr:GetAuthorizationToken"})
                else:
                    password = api.first_passwords.pop(0) if api.first_passwords else api.password
                    token = base64.b64encode(f"AWS:{password}".encode()).decode()
                    self._send(200, {"authorizationData": [{
                        "authorizationToken": token,
                        "expiresAt": time.time() + api.expires_in,
                        "proxyEndpoint": f"https://{EKS_ACCOUNT}.dkr.ecr.us-west-2.amazonaws.com",
                    }]})  # fmt: skip

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
                if "__type" in doc:
                    self.send_header("x-amzn-ErrorType", str(doc["__type"]))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def endpoint_flags(mapping: Mapping[str, str]) -> list[str]:
    """``--registry-endpoint HOST=URL`` for each (registry host, base URL)."""
    out: list[str] = []
    for host, url in mapping.items():
        out += ["--registry-endpoint", f"{host}={url}"]
    return out
