"""Helpers shared by the server tests (test_app, test_server) and bench/load.py.

Real parts only: AdmissionReviews as the kube-apiserver sends them, policy
directories laid out as the kubelet mounts a ConfigMap, certificates from
``webhook.certs``, TLS clients configured like the kube-apiserver's.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

SOURCE_REGISTRY = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
REGION = "ap-southeast-4"
TARGET_REGISTRY = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"
ORIGINALS = "ecr-webhook.io/original-images"


def aws_node_pod(registry: str = SOURCE_REGISTRY) -> dict[str, Any]:
    """An aws-node pod as its DaemonSet creates it (VPC CNI manifest, trimmed)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "aws-node-",
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/name": "aws-node", "k8s-app": "aws-node",
                       "controller-revision-hash": "5d6f8c7b9", "pod-template-generation": "1"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                 "name": "aws-node", "uid": "8b0a3c1e-3f37-4d5e-9a55-2f2b5f0d9c11",
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "serviceAccountName": "aws-node",
            "hostNetwork": True,
            "priorityClassName": "system-node-critical",
            "terminationGracePeriodSeconds": 10,
            "initContainers": [{
                "name": "aws-vpc-cni-init",
                "image": f"{registry}/amazon-k8s-cni-init:v1.19.2-eksbuild.1",
                "env": [{"name": "DISABLE_TCP_EARLY_DEMUX", "value": "false"},
                        {"name": "ENABLE_IPv6", "value": "false"}],
                "securityContext": {"privileged": True},
                "volumeMounts": [{"mountPath": "/host/opt/cni/bin", "name": "cni-bin-dir"}],
            }],
            "containers": [
                {
                    "name": "aws-node",
                    "image": f"{registry}/amazon-k8s-cni:v1.19.2-eksbuild.1",
                    "ports": [{"containerPort": 61678, "name": "metrics"}],
                    "env": [{"name": "ADDITIONAL_ENI_TAGS", "value": "{}"},
                            {"name": "AWS_VPC_CNI_NODE_PORT_SUPPORT", "value": "true"},
                            {"name": "AWS_VPC_ENI_MTU", "value": "9001"},
                            {"name": "AWS_VPC_K8S_CNI_LOGLEVEL", "value": "DEBUG"},
                            {"name": "CLUSTER_NAME", "value": "demo"},
                            {"name": "ENABLE_PREFIX_DELEGATION", "value": "false"},
                            {"name": "MY_NODE_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "WARM_ENI_TARGET", "value": "1"}],
                    "livenessProbe": {"exec": {"command": ["/app/grpc-health-probe",
                                                           "-addr=:50051"]},
                                      "initialDelaySeconds": 60, "timeoutSeconds": 10},
                    "resources": {"requests": {"cpu": "25m"}},
                    "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
                    "volumeMounts": [{"mountPath": "/host/opt/cni/bin", "name": "cni-bin-dir"},
                                     {"mountPath": "/host/etc/cni/net.d", "name": "cni-net-dir"},
                                     {"mountPath": "/var/log/aws-routed-eni", "name": "log-dir"},
                                     {"mountPath": "/var/run/aws-node", "name": "run-dir"}],
                },
                {
                    "name": "aws-eks-nodeagent",
                    "image": f"{registry}/amazon/aws-network-policy-agent:v1.1.6-eksbuild.1",
                    "args": ["--enable-ipv6=false", "--enable-network-policy=false",
                             "--enable-cloudwatch-logs=false", "--metrics-bind-addr=:8162",
                             "--health-probe-bind-addr=:8163"],
                    "resources": {"requests": {"cpu": "25m"}},
                    "securityContext": {"privileged": True},
                    "volumeMounts": [{"mountPath": "/sys/fs/bpf", "name": "bpf-pin-path"},
                                     {"mountPath": "/var/log/aws-routed-eni", "name": "log-dir"}],
                },
            ],
            "volumes": [{"name": n, "hostPath": {"path": p}} for n, p in (
                ("bpf-pin-path", "/sys/fs/bpf"), ("cni-bin-dir", "/opt/cni/bin"),
                ("cni-net-dir", "/etc/cni/net.d"), ("log-dir", "/var/log/aws-routed-eni"),
                ("run-dir", "/var/run/aws-node"))],
            "tolerations": [{"operator": "Exists"}],
        },
    }  # fmt: skip


def admission_review(
    pod: Mapping[str, Any] | None = None,
    *,
    api_version: str = "admission.k8s.io/v1",
    uid: str | None = None,
    operation: str = "CREATE",
    sub_resource: str | None = None,
    resource: str = "pods",
    dry_run: bool = False,
    namespace: str = "kube-system",
) -> dict[str, Any]:
    """An AdmissionReview request as the kube-apiserver sends it."""
    pod = copy.deepcopy(dict(pod if pod is not None else aws_node_pod()))
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": resource},
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:daemon-set-controller",
                     "uid": "3c0e9b0c-2d7c-4f8e-8b34-0d1f0b5bd1a7",
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": pod,
        "oldObject": None,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }  # fmt: skip
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


def decode_patch(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    import base64

    raw = response.get("patch")
    return json.loads(base64.b64decode(raw)) if raw else []


def images(pod: Mapping[str, Any]) -> dict[str, str]:
    spec = pod["spec"]
    return {c["name"]: c["image"]
            for kind in ("initContainers", "containers", "ephemeralContainers")
            for c in spec.get(kind) or []}  # fmt: skip


# --------------------------------------------------------------------- ConfigMap volume


class ConfigMapDir:
    """A directory laid out like a kubelet ConfigMap volume.

    ``policy.yaml -> ..data/policy.yaml``, ``..data -> ..<n>``; ``update``
    writes a new timestamped directory and swaps ``..data`` atomically with a
    rename, as kubernetes pkg/volume/util/atomic_writer.go does.
    """

    def __init__(self, root: Path, key: str = "policy.yaml") -> None:
        self.root = root
        self.key = key
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.root / self.key

    def update(self, text: str) -> None:
        self.generation += 1
        gen = self.root / f"..2025_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        gen.mkdir()
        (gen / self.key).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(gen.name)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.key}")


# --------------------------------------------------------------------- networking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apiserver_tls_context(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """Verify like the kube-apiserver: the caBundle only, SANs only (no Common Name)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.hostname_checks_common_name = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def https_connection(port: int, ctx: ssl.SSLContext, host: str = "localhost",
                     timeout: float = 10) -> http.client.HTTPSConnection:  # fmt: skip
    """An HTTPS connection to 127.0.0.1:``port`` that verifies the certificate for ``host``."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    conn.host = host
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda addr, *a, **kw: socket.create_connection(("127.0.0.1", port), *a, **kw)
    )
    return conn


def post_review(
    port: int,
    ctx: ssl.SSLContext,
    body: Mapping[str, Any] | bytes,
    *,
    host: str = "localhost",
    content_type: str = "application/json",
    timeout: float = 10,
    conn: http.client.HTTPSConnection | None = None,
) -> tuple[int, Any]:
    """POST to /mutate over TLS; (status, decoded JSON body)."""
    own = conn is None
    c = conn or https_connection(port, ctx, host, timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        c.request("POST", "/mutate", body=data, headers={"Content-Type": content_type})
        resp = c.getresponse()
        raw = resp.read()
    finally:
        if own:
            c.close()
    return resp.status, json.loads(raw) if raw else None


def get(port: int, path: str, ctx: ssl.SSLContext | None = None, host: str = "localhost",
        timeout: float = 10) -> tuple[int, str]:  # fmt: skip
    """GET over TLS (ctx given) or plain HTTP."""
    if ctx is None:
        c: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=timeout
        )
    else:
        c = https_connection(port, ctx, host, timeout)
    try:
        c.request("GET", path)
        resp = c.getresponse()
        return resp.status, resp.read().decode()
    finally:
        c.close()


def peer_certificate(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> bytes:
    """The DER certificate the server presents (verified with ``ctx``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:  # fmt: skip
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


# --------------------------------------------------------------------- server processes


def ecr_webhook() -> list[str]:
    """The installed console script, as documented (``ecr-webhook ...``)."""
    exe = Path(sys.executable).with_name("ecr-webhook")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "webhook"]


def settled(read: Callable[[], _T]) -> _T:
    """``read()`` once every worker has flushed what earlier requests counted
    (``webhook.metrics.FLUSH_SECONDS``, plus slack): a baseline to count from."""
    from webhook.metrics import FLUSH_SECONDS

    time.sleep(FLUSH_SECONDS + 0.5)
    return read()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; ``AssertionError`` naming ``what`` after ``timeout``.

    For example ``serve``'s per-request metrics: a worker writes them to the
    shared files every second (``webhook.metrics.FLUSH_SECONDS``), so a scrape
    answered by another worker sees them up to that late.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ServerProcess:
    """A server started as a subprocess (own process group), stopped on exit."""

    def __init__(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, stdout: Path | None = None,
                 stderr: Path | None = None) -> None:  # fmt: skip
        self.stdout_path = stdout
        self.stderr_path = stderr
        self._out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
        self._err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env) if env is not None else None,
            stdout=self._out, stderr=self._err, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, port: int, ctx: ssl.SSLContext, timeout: float = 30) -> None:
        """Poll /readyz over TLS until 200; fail with the server's stderr otherwise."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.stderr()}")
            try:
                status, _ = get(port, "/readyz", ctx, timeout=2)
                if status == 200:
                    return
                last = status
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s ({last}): {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:] if self.stderr_path else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful), then SIGKILL to the whole group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Workers are in the same process group; make sure none outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for f in (self._out, self._err):
            if not isinstance(f, int):
                f.close()
        return int(self.proc.returncode)


class Served:
    """A ``serve`` under test: its directory (certificates, audit log), process and port."""

    def __init__(self, tmp: Path, proc: ServerProcess, port: int, metrics_port: int) -> None:
        self.tmp, self.proc, self.port, self.metrics_port = tmp, proc, port, metrics_port
        self.ctx = apiserver_tls_context(tmp / "ca.crt")

    def metric(self, sample: str) -> float:
        """The value of one sample (name with labels, as exposed) on /metrics; 0 when absent."""
        status, text = get(self.metrics_port, "/metrics")
        assert status == 200, text
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0

    def tls(self, timeout: float = 10) -> ssl.SSLSocket:
        """A raw TLS connection to the admission port, as the apiserver opens it."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.ctx.wrap_socket(raw, server_side=False, server_hostname="localhost")


@contextlib.contextmanager
def served(tmp: Path, *flags: str) -> Iterator[Served]:
    """``ecr-webhook serve`` on loopback with a fresh certificate, the region of these
    tests and an audit file in ``tmp``, plus ``flags``; ready on entry, and stopped
    cleanly (exit 0) on exit."""
    from webhook import certs

    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    port, metrics_port = free_port(), free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--cert-file", str(tmp / "tls.crt"),
            "--key-file", str(tmp / "tls.key"), "--region", REGION,
            "--audit-log", str(tmp / "audit.log"), *flags]  # fmt: skip
    proc = ServerProcess(argv, stderr=tmp / "stderr.log")
    srv = Served(tmp, proc, port, metrics_port)
    try:
        proc.wait_ready(port, srv.ctx)
        yield srv
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr()
