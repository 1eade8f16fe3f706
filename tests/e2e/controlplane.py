"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback, for tests.

Optionally (``controller_manager=True`` / ``--controller-manager``) it also runs
kube-controller-manager with a few controllers (DaemonSet, ServiceAccount), so
that a DaemonSet makes Pods for the Node objects a test creates.

The binaries are built from pinned Go modules by ``build_controlplane.sh`` (next
to this file) into a cache directory outside the repository; see README.md.

As a library::

    from controlplane import ControlPlane

    with ControlPlane() as cp:
        print(cp.server, cp.kubeconfig, cp.ca_file)

As a program (for humans, and for tests that want a separate process)::

    python tests/e2e/controlplane.py --kubeconfig /tmp/kc.yaml

prints ``ready`` on its own line once the API server answers ``/readyz`` (and,
with ``--controller-manager``, kube-controller-manager answers ``/healthz``) and
the kubeconfig is written, then runs until SIGINT/SIGTERM, stops
kube-controller-manager, kube-apiserver and etcd and removes its temporary state
(including the kubeconfig it wrote).

Only stdlib and ``cryptography`` are needed. Nothing here listens on, or talks
to, anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build_controlplane.sh"

LOOPBACK = "127.0.0.1"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# First address of the service range: the ClusterIP of the `kubernetes` Service.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Without kube-controller-manager nothing creates the `default` ServiceAccount
# in new namespaces, so the ServiceAccount admission plugin would reject every
# Pod. Disabled by default, as in controller-runtime's envtest; pass
# ``disable_admission_plugins=()`` and create ServiceAccounts to keep it.
DEFAULT_DISABLED_ADMISSION_PLUGINS: tuple[str, ...] = ("ServiceAccount",)
# kube-controller-manager's controllers when it is enabled (canonical names,
# k8s.io/kubernetes cmd/kube-controller-manager/names): the DaemonSet controller
# (creates a DaemonSet's Pods), the ServiceAccount controller (creates the
# `default` ServiceAccount in every namespace, so the ServiceAccount admission
# plugin can stay on) and the legacy token controller (fills in
# kubernetes.io/service-account-token Secrets). No node lifecycle controller:
# it would taint every Node NotReady, as no kubelet posts heartbeats here.
DEFAULT_CONTROLLERS: tuple[str, ...] = (
    "daemonset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
)
# The user the bootstrap RBAC policy binds to ClusterRole
# system:kube-controller-manager (k8s.io/apiserver user.KubeControllerManager).
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class BuildError(RuntimeError):
    """The control-plane binaries could not be built."""


class ControlPlaneError(RuntimeError):
    """etcd, kube-apiserver or kube-controller-manager failed to start or died."""


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane binaries."""

    directory: Path

    @property
    def kube_apiserver(self) -> Path:
        return self.directory / "kube-apiserver"

    @property
    def etcd(self) -> Path:
        return self.directory / "etcd"

    @property
    def kubectl(self) -> Path:
        return self.directory / "kubectl"

    @property
    def kube_controller_manager(self) -> Path:
        return self.directory / "kube-controller-manager"


def build_binaries(*, echo: IO[str] | None = sys.stderr) -> Binaries:
    """Build (or find in the cache) kube-apiserver, kube-controller-manager, etcd, kubectl.

    Runs ``build_controlplane.sh``; a no-op when the cache already holds the
    binaries. Its progress is copied to ``echo`` (None: silent). Raises
    :class:`BuildError` carrying the tail of the build output on failure.
    """
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail: deque[str] = deque(maxlen=60)

    def pump(stream: IO[str]) -> None:
        for line in stream:
            tail.append(line)
            if echo is not None:
                echo.write(line)
                echo.flush()

    assert proc.stderr is not None and proc.stdout is not None
    pumper = threading.Thread(target=pump, args=(proc.stderr,), daemon=True)
    pumper.start()
    stdout = proc.stdout.read()
    code = proc.wait()
    pumper.join()
    if code != 0:
        raise BuildError(f"{BUILD_SCRIPT} exited with {code}; last output:\n" + "".join(tail))
    lines = stdout.strip().splitlines()
    binaries = Binaries(Path(lines[-1]) if lines else Path())
    for path in (
        binaries.kube_apiserver,
        binaries.kube_controller_manager,
        binaries.etcd,
        binaries.kubectl,
    ):
        if not os.access(path, os.X_OK):
            raise BuildError(f"{BUILD_SCRIPT} succeeded but {path} is missing")
    return binaries


# ---------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA that can issue serving and client certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "ecr-webhook-e2e-ca") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> tuple[bytes, bytes]:
        """Issue a leaf certificate; returns ``(cert_pem, key_pem)``."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
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
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# -------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _child_env() -> dict[str, str]:
    # Everything is on loopback; never let a proxy setting redirect it.
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: have Linux SIGKILL the child if the launching thread dies.

    SIGKILL, not SIGTERM: both children would get it at once, and a
    kube-apiserver whose etcd is gone hangs in its graceful shutdown.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _kubeconfig_yaml(
    server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str = "e2e-admin"
) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    # JSON string quoting is valid YAML, so values are emitted with json.dumps.
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: e2e\n"
        "  cluster:\n"
        f"    server: {json.dumps(server)}\n"
        f"    certificate-authority-data: {b64(ca_pem)}\n"
        "users:\n"
        f"- name: {json.dumps(user)}\n"
        "  user:\n"
        f"    client-certificate-data: {b64(cert_pem)}\n"
        f"    client-key-data: {b64(key_pem)}\n"
        "contexts:\n"
        "- name: e2e\n"
        "  context:\n"
        "    cluster: e2e\n"
        f"    user: {json.dumps(user)}\n"
        "    namespace: default\n"
        "current-context: e2e\n"
    )


# --------------------------------------------------------------------- control plane


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ optionally kube-controller-manager) on 127.0.0.1.

    ``start()`` builds the binaries if needed, generates certificates in a
    temporary directory, starts etcd and kube-apiserver on free loopback ports,
    waits for ``/readyz`` (and for the ``default``/``kube-system`` namespaces) and
    writes the admin kubeconfig; with ``controller_manager=True`` it then starts
    kube-controller-manager and waits for its ``/healthz``. ``stop()`` terminates
    the processes (controller-manager, apiserver, etcd) and removes the temporary
    directory. Also usable as a context manager.

    Arguments:
        kubeconfig_path: where to write the admin kubeconfig (default: in the temp dir).
            Written by ``start()``, removed by ``stop()``.
        log_dir: where ``etcd.log`` and ``kube-apiserver.log`` go (default: in the
            temp dir, i.e. removed by ``stop()``); give one to keep the logs.
        binaries: prebuilt binaries (default: ``build_binaries()``).
        extra_apiserver_args: appended to the kube-apiserver command line
            (a later ``--flag=value`` overrides an earlier one).
        disable_admission_plugins: passed to ``--disable-admission-plugins``.
        start_timeout: seconds to wait for each process to become ready.
        controller_manager: also run kube-controller-manager (default: no). Its
            ServiceAccount controller creates every namespace's ``default``
            ServiceAccount, so ``disable_admission_plugins=()`` is then usable.
        controllers: its ``--controllers`` (default :data:`DEFAULT_CONTROLLERS`).
        extra_controller_manager_args: appended to its command line.

    kube-controller-manager authenticates as ``system:kube-controller-manager``
    (client certificate from the cluster CA) and runs with
    ``--use-service-account-credentials=true``, as kubeadm and EKS run it: each
    controller then acts as its own ServiceAccount (Pods of a DaemonSet are
    created by ``system:serviceaccount:kube-system:daemon-set-controller``).
    With ``false`` every controller would act as ``system:kube-controller-manager``,
    whose bootstrap ClusterRole may not create Pods or ControllerRevisions
    (k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go):
    the DaemonSet controller then logs "controllerrevisions.apps is forbidden"
    and makes no Pod (tried with v1.37.2).
    """

    kubeconfig_path: Path | None = None
    log_dir: Path | None = None
    binaries: Binaries | None = None
    extra_apiserver_args: Sequence[str] = ()
    disable_admission_plugins: Sequence[str] = DEFAULT_DISABLED_ADMISSION_PLUGINS
    start_timeout: float = 120.0
    controller_manager: bool = False
    controllers: Sequence[str] = DEFAULT_CONTROLLERS
    extra_controller_manager_args: Sequence[str] = ()

    # Set by start():
    tmp_dir: Path = field(init=False, default=Path())
    kubeconfig: Path = field(init=False, default=Path())
    server: str = field(init=False, default="")
    ca: CertificateAuthority | None = field(init=False, default=None)
    ca_file: Path = field(init=False, default=Path())
    client_cert_file: Path = field(init=False, default=Path())
    client_key_file: Path = field(init=False, default=Path())
    etcd_url: str = field(init=False, default="")
    etcd_log: Path = field(init=False, default=Path())
    apiserver_log: Path = field(init=False, default=Path())
    # Only with controller_manager=True:
    controller_manager_log: Path = field(init=False, default=Path())
    controller_manager_url: str = field(init=False, default="")
    controller_manager_kubeconfig: Path = field(init=False, default=Path())
    _etcd: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _apiserver: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _controller_manager: subprocess.Popen[bytes] | None = field(
        init=False, default=None, repr=False
    )
    _log_files: list[IO[bytes]] = field(init=False, default_factory=list, repr=False)
    _started: bool = field(init=False, default=False, repr=False)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start etcd, kube-apiserver (and kube-controller-manager); return once ready."""
        if self._started:
            raise ControlPlaneError("control plane already started")
        if self.binaries is None:
            self.binaries = build_binaries()
        self._started = True
        try:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="ecr-webhook-e2e-"))
            logs = self.log_dir or self.tmp_dir
            logs.mkdir(parents=True, exist_ok=True)
            self.etcd_log = logs / "etcd.log"
            self.apiserver_log = logs / "kube-apiserver.log"
            self._start_etcd()
            self._start_apiserver()
            if self.controller_manager:
                self.controller_manager_log = logs / "kube-controller-manager.log"
                self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the controller-manager, kube-apiserver, then etcd; remove temporary state.

        Idempotent.
        """
        for proc in (self._controller_manager, self._apiserver, self._etcd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._controller_manager = self._apiserver = self._etcd = None
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        if self.kubeconfig_path is not None:
            self.kubeconfig_path.unlink(missing_ok=True)
        if self.tmp_dir != Path() and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- queries

    def _processes(
        self,
    ) -> list[tuple[str, subprocess.Popen[bytes] | None, Path]]:
        procs = [
            ("etcd", self._etcd, self.etcd_log),
            ("kube-apiserver", self._apiserver, self.apiserver_log),
        ]
        if self.controller_manager:
            procs.append(
                ("kube-controller-manager", self._controller_manager, self.controller_manager_log)
            )
        return procs

    def is_running(self) -> bool:
        """True while etcd and kube-apiserver (and the controller-manager, if enabled) live."""
        return all(p is not None and p.poll() is None for _, p, _ in self._processes())

    def check_running(self) -> None:
        """Raise :class:`ControlPlaneError` (with log tails) if a process died."""
        for name, proc, log in self._processes():
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ControlPlaneError(
                    f"{name} is not running (exit code {code}); last log lines of "
                    f"{log}:\n{_tail(log)}"
                )

    def kubectl(self, *args: str) -> list[str]:
        """Argv for the built kubectl against this cluster, e.g. ``kubectl("get", "ns")``."""
        assert self.binaries is not None
        return [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args]

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the cluster CA and presents the admin cert."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return ctx

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the API server as admin; returns ``(status, body)``."""
        req = urllib.request.Request(self.server + path)
        https = urllib.request.HTTPSHandler(context=self.ssl_context())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
        try:
            with opener.open(req, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    # ---------------------------------------------------------------- internals

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        f = log.open("ab")
        self._log_files.append(f)
        f.write(f"# {' '.join(argv)}\n".encode())
        f.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_dir,
            env=_child_env(),
            # Own session: a terminal's Ctrl-C reaches only us; we stop the
            # children in order. PDEATHSIG covers us being SIGKILLed.
            start_new_session=True,
            # The child only makes one prctl call (libc is loaded beforehand).
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )

    def _wait(
        self, name: str, proc: subprocess.Popen[bytes], log: Path, ready: Iterator[bool]
    ) -> None:
        deadline = time.monotonic() + self.start_timeout
        for ok in ready:
            if ok:
                return
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} during start-up; last log "
                    f"lines of {log}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{name} not ready after {self.start_timeout:.0f}s; last log lines of "
                    f"{log}:\n{_tail(log)}"
                )
            time.sleep(0.2)

    def _start_etcd(self) -> None:
        assert self.binaries is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://{LOOPBACK}:{client}"
        peer_url = f"http://{LOOPBACK}:{peer}"
        self._etcd = self._spawn(
            [
                str(self.binaries.etcd),
                "--name=e2e",
                f"--data-dir={self.tmp_dir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=e2e={peer_url}",
                "--initial-cluster-state=new",
                # Throwaway test data: skip fsync, it only costs time.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.etcd_log,
        )

        def healthy() -> Iterator[bool]:
            while True:
                try:
                    with _NO_PROXY_OPENER.open(self.etcd_url + "/health", timeout=2) as r:
                        yield json.loads(r.read()).get("health") == "true"
                except (OSError, ValueError):
                    yield False

        self._wait("etcd", self._etcd, self.etcd_log, healthy())

    def _start_apiserver(self) -> None:
        assert self.binaries is not None
        d = self.tmp_dir
        ca = self.ca = CertificateAuthority.create()
        self.ca_file = _write(d / "ca.crt", ca.cert_pem)
        serving_cert, serving_key = ca.issue(
            "kube-apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=(LOOPBACK, "::1", KUBERNETES_SERVICE_IP),
            server=True,
        )
        _write(d / "apiserver.crt", serving_cert)
        _write(d / "apiserver.key", serving_key, 0o600)
        admin_cert, admin_key = ca.issue(
            "kubernetes-admin", organizations=("system:masters",), client=True
        )
        self.client_cert_file = _write(d / "admin.crt", admin_cert)
        self.client_key_file = _write(d / "admin.key", admin_key, 0o600)
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write(d / "sa.key", _key_pem(sa_key), 0o600)
        _write(
            d / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

        port = free_port()
        self.server = f"https://{LOOPBACK}:{port}"
        self.kubeconfig = self.kubeconfig_path or d / "kubeconfig"
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={port}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--client-ca-file={self.ca_file}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            # The default plugin set already has these; named for clarity.
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            f"--disable-admission-plugins={','.join(self.disable_admission_plugins)}",
            "--allow-privileged=true",
            # kube-apiserver refuses a loopback --advertise-address with the
            # default "lease" reconciler of the `kubernetes` Service endpoints;
            # nothing here routes to that Service, so do not maintain them.
            "--endpoint-reconciler-type=none",
            *self.extra_apiserver_args,
        ]
        self._apiserver = self._spawn(argv, self.apiserver_log)

        def ready() -> Iterator[bool]:
            while True:
                try:
                    status, _ = self.get("/readyz", timeout=5)
                    if status != 200:
                        yield False
                        continue
                    # The bootstrap controller creates these just after /readyz.
                    yield all(
                        self.get(f"/api/v1/namespaces/{ns}", timeout=5)[0] == 200
                        for ns in ("default", "kube-system")
                    )
                except OSError:
                    yield False

        self._wait("kube-apiserver", self._apiserver, self.apiserver_log, ready())
        _write(
            self.kubeconfig,
            _kubeconfig_yaml(self.server, ca.cert_pem, admin_cert, admin_key).encode(),
            0o600,
        )

    def _start_controller_manager(self) -> None:
        assert self.binaries is not None and self.ca is not None
        d = self.tmp_dir
        client_cert, client_key = self.ca.issue(CONTROLLER_MANAGER_USER, client=True)
        kubeconfig = self.controller_manager_kubeconfig = _write(
            d / "controller-manager.kubeconfig",
            _kubeconfig_yaml(
                self.server, self.ca.cert_pem, client_cert, client_key, CONTROLLER_MANAGER_USER
            ).encode(),
            0o600,
        )
        serving_cert, serving_key = self.ca.issue(
            "kube-controller-manager",
            dns_names=("localhost",),
            ip_addresses=(LOOPBACK,),
            server=True,
        )
        _write(d / "controller-manager.crt", serving_cert)
        _write(d / "controller-manager.key", serving_key, 0o600)
        port = free_port()
        self.controller_manager_url = f"https://{LOOPBACK}:{port}"
        argv = [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kubeconfig}",
            # Its own HTTPS endpoint delegates authn/authz to the API server, as
            # kubeadm configures it; /healthz is always allowed.
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--client-ca-file={self.ca_file}",
            # The client CA is given; without this it would also look up the
            # request-header CA in kube-system/extension-apiserver-authentication,
            # which this apiserver (no --requestheader-client-ca-file) leaves
            # empty, and log an error about it every few seconds.
            "--authentication-skip-lookup=true",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--tls-cert-file={d / 'controller-manager.crt'}",
            f"--tls-private-key-file={d / 'controller-manager.key'}",
            f"--controllers={','.join(self.controllers)}",
            # Each controller acts as its own ServiceAccount (see the class docstring).
            "--use-service-account-credentials=true",
            # The key the API server verifies tokens with (legacy token Secrets).
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            # One instance, nothing to elect; saves the Lease round trips.
            "--leader-elect=false",
            *self.extra_controller_manager_args,
        ]
        self._controller_manager = self._spawn(argv, self.controller_manager_log)
        # Verify its serving certificate like any client; no client certificate
        # (a kubelet liveness probe does the same).
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
        )

        def healthy() -> Iterator[bool]:
            while True:
                try:
                    with opener.open(self.controller_manager_url + "/healthz", timeout=5) as r:
                        yield r.status == 200
                except OSError:  # refused, TLS, HTTP 5xx (HTTPError)
                    yield False

        self._wait(
            "kube-controller-manager",
            self._controller_manager,
            self.controller_manager_log,
            healthy(),
        )


# ----------------------------------------------------------------------------- CLI


class _Terminated(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run etcd + kube-apiserver on 127.0.0.1 until SIGINT/SIGTERM."
    )
    parser.add_argument(
        "--controller-manager",
        action="store_true",
        help="also run kube-controller-manager (DaemonSet and ServiceAccount controllers) "
        "and enable the ServiceAccount admission plugin",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, required=True, help="write the admin kubeconfig here"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="keep etcd/kube-apiserver logs here"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="build the binaries, print their dir, exit"
    )
    args = parser.parse_args(argv)

    if args.build_only:
        try:
            print(build_binaries().directory, flush=True)
        except BuildError as e:
            print(e, file=sys.stderr)
            return 1
        return 0

    def on_signal(signum: int, _frame: types.FrameType | None) -> None:
        # One signal is enough; ignore repeats while we shut down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    cp = ControlPlane(
        kubeconfig_path=args.kubeconfig.resolve(),
        log_dir=args.log_dir,
        controller_manager=args.controller_manager,
        # Its ServiceAccount controller creates the `default` ServiceAccounts the
        # admission plugin requires, so the plugin can stay on.
        disable_admission_plugins=(
            () if args.controller_manager else DEFAULT_DISABLED_ADMISSION_PLUGINS
        ),
    )
    try:
        started = time.monotonic()
        cp.start()
        print(
            f"kube-apiserver {cp.server} ready in {time.monotonic() - started:.1f}s\n"
            f"  kubeconfig: {cp.kubeconfig}\n"
            f"  kubectl:    {' '.join(cp.kubectl())}\n"
            f"  logs:       {cp.apiserver_log} {cp.etcd_log}"
            + (
                f" {cp.controller_manager_log}\n"
                f"  kube-controller-manager: {cp.controller_manager_url} "
                f"(--controllers={','.join(cp.controllers)})"
                if cp.controller_manager
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        print("ready", flush=True)
        while True:
            time.sleep(1)
            cp.check_running()
    except _Terminated as e:
        print(f"{e}: stopping", file=sys.stderr, flush=True)
        return 0
    except (BuildError, ControlPlaneError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
