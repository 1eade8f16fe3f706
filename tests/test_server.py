"""The real server: gunicorn over TLS on loopback, as the kube-apiserver calls it.

Every server here is a subprocess (its own process group, stopped with SIGTERM
and then killed as a group if it lingers).  Clients verify the certificate with
the generated CA only and with ``hostname_checks_common_name = False``, as the
kube-apiserver's Go TLS stack does.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import (
    ORIGINALS,
    REGION,
    TARGET_REGISTRY,
    ConfigMapDir,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    aws_node_pod,
    decode_patch,
    ecr_webhook,
    free_port,
    get,
    https_connection,
    images,
    peer_certificate,
    post_review,
    settled,
    wait_until,
)
from webhook.config import ServeConfig

pytestmark = pytest.mark.slow

RUN_SERVER = """
import json, sys
from webhook.config import ServeConfig
from webhook.server import run
raise SystemExit(run(ServeConfig(**json.loads(sys.argv[1]))))
"""
MIRROR = "111122223333.dkr.ecr.ap-southeast-4.amazonaws.com"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ecr_webhook(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, check=False)  # fmt: skip


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------- server A: run() API


class Served:
    def __init__(self, tmp: Path, proc: ServerProcess, config: ServeConfig) -> None:
        self.tmp = tmp
        self.proc = proc
        self.config = config
        self.ctx = apiserver_tls_context(tmp / "tls" / "ca.crt")

    @property
    def port(self) -> int:
        return self.config.port

    def audit_records(self) -> list[dict[str, Any]]:
        base = Path(self.config.audit_log)
        files = sorted(base.parent.glob(base.name + "*"))
        out: list[dict[str, Any]] = []
        for f in files:
            if f.suffix == ".lock":
                continue
            out.extend(json.loads(line) for line in f.read_text().splitlines())
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two workers, four threads, audit to a small rotating file (rotation under load)."""
    tmp = tmp_path_factory.mktemp("server")
    assert cli("certs", "generate", "--out-dir", str(tmp / "tls"), "--dns", "localhost",
               "--ip", "127.0.0.1").returncode == 0  # fmt: skip
    policy = ConfigMapDir(tmp / "policy")
    policy.update("apiVersion: ecr-webhook.io/v1alpha1\nkind: RewritePolicy\n")
    config = ServeConfig(
        host="127.0.0.1", port=free_port(), metrics_port=free_port(),
        cert_file=str(tmp / "tls" / "tls.crt"), key_file=str(tmp / "tls" / "tls.key"),
        policy_file=str(policy.path), region=REGION, audit_log=str(tmp / "audit" / "audit.log"),
        audit_max_bytes=64 * 1024, audit_backups=200, workers=2, threads=4,
    )  # fmt: skip
    (tmp / "audit").mkdir()
    proc = ServerProcess([sys.executable, "-c", RUN_SERVER, json.dumps(asdict(config))],
                         stderr=tmp / "stderr.log")  # fmt: skip
    served = Served(tmp, proc, config)
    try:
        proc.wait_ready(config.port, served.ctx)
        yield served
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr()


def test_done_when_aws_node_review_over_tls_gives_the_patch(server: Served) -> None:
    """Done-when: a real AdmissionReview over TLS; the returned patch, applied, fixes the pod."""
    pod = aws_node_pod()
    status, doc = post_review(server.port, server.ctx, admission_review(pod, uid="done-when"))
    assert status == 200
    response = doc["response"]
    assert doc["apiVersion"] == "admission.k8s.io/v1"
    assert response["uid"] == "done-when"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, decode_patch(response))
    assert images(patched) == {
        "aws-vpc-cni-init": f"{TARGET_REGISTRY}/amazon-k8s-cni-init:v1.19.2-eksbuild.1",
        "aws-node": f"{TARGET_REGISTRY}/amazon-k8s-cni:v1.19.2-eksbuild.1",
        "aws-eks-nodeagent": f"{TARGET_REGISTRY}/amazon/aws-network-policy-agent:v1.1.6-eksbuild.1",
    }
    assert json.loads(patched["metadata"]["annotations"][ORIGINALS]) == images(pod)
    assert len(response["warnings"]) == 3
    for warning, name in zip(response["warnings"], images(pod), strict=True):
        assert len(warning) <= 120
        assert f"container {name}" in warning
    # The audit record of this admission is in the file.
    (record,) = [r for r in server.audit_records() if r["auditID"] == "done-when"]
    assert record["decision"] == "patched"
    assert len(record["containers"]) == 3


def test_v1beta1_is_echoed_over_tls(server: Served) -> None:
    status, doc = post_review(
        server.port, server.ctx, admission_review(api_version="admission.k8s.io/v1beta1", uid="b1")
    )
    assert status == 200
    assert doc["apiVersion"] == "admission.k8s.io/v1beta1"
    assert doc["response"]["uid"] == "b1"


def test_bad_inputs_over_tls_are_4xx_never_5xx(server: Served) -> None:
    assert post_review(server.port, server.ctx, b"{nope")[0] == 400
    assert post_review(server.port, server.ctx, admission_review(), content_type="text/plain")[0] \
        == 415  # fmt: skip
    big = admission_review()
    big["request"]["object"]["metadata"]["annotations"] = {"x": "y" * (7 * 1024 * 1024)}
    status, doc = post_review(server.port, server.ctx, big)
    assert status == 413
    assert doc["code"] == 413
    # And the server is still serving.
    assert post_review(server.port, server.ctx, admission_review())[0] == 200


def test_tls_is_1_2_minimum(server: Served) -> None:
    ctx12 = apiserver_tls_context(server.tmp / "tls" / "ca.crt")
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx12.wrap_socket(raw, server_hostname="localhost") as tls:  # fmt: skip
        assert tls.version() == "TLSv1.2"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError):
        pytest.skip("this OpenSSL cannot act as a TLS 1.1 client")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError) as info:  # fmt: skip
        old.wrap_socket(raw, server_hostname="localhost").close()
    if "NO_PROTOCOLS_AVAILABLE" in str(info.value):
        pytest.skip("this OpenSSL cannot act as a TLS 1.1 client")
    # The refusal is the server's: a protocol_version alert (RFC 8446 section 6.2).
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in str(info.value), info.value


def test_audit_is_complete_under_concurrent_load(server: Served) -> None:
    """N admissions from many threads and connections give exactly N whole records.

    The audit file is capped at 64 KiB, so it rotates many times while both
    workers write; every line must still parse and every uid appear once.
    """
    threads, per_thread = 24, 25
    before = settled(lambda: metrics(server.config.metrics_port))  # earlier tests' counts in
    errors: list[BaseException] = []

    def client(t: int) -> None:
        conn = https_connection(server.port, server.ctx, timeout=30)
        try:
            for i in range(per_thread):
                status, doc = post_review(
                    server.port, server.ctx, admission_review(uid=f"load-{t}-{i}"), conn=conn
                )
                assert status == 200 and doc["response"]["uid"] == f"load-{t}-{i}"
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors, errors[:3]
    expected = {f"load-{t}-{i}" for t in range(threads) for i in range(per_thread)}

    def load_ids() -> list[object]:
        ids = (r["auditID"] for r in server.audit_records())
        return [i for i in ids if str(i).startswith("load-")]

    # Records of a busy worker may wait up to about 50 ms after their answers
    # (README, "Audit records"); none may be missing after that.
    wait_until(lambda: len(load_ids()) >= len(expected), 5, "every load record written")
    records = server.audit_records()  # json.loads of every line: none torn or interleaved
    ids = [r["auditID"] for r in records if str(r["auditID"]).startswith("load-")]
    assert len(ids) == len(expected)
    assert set(ids) == expected
    assert all(r["kind"] == "EcrWebhookAudit" and r["schemaVersion"] == "v1" for r in records)
    rotated = list(Path(server.config.audit_log).parent.glob("audit.log.*"))
    assert len([f for f in rotated if f.suffix != ".lock"]) >= 2
    # The scrape adds up both workers: the counter moved by exactly N (once both
    # workers have flushed: within a second).
    start = sample(before, "ecr_webhook_requests_total", code="200", result="patched")

    def moved() -> float:
        return sample(metrics(server.config.metrics_port), "ecr_webhook_requests_total",
                      code="200", result="patched") - start  # fmt: skip

    wait_until(lambda: moved() >= len(expected), 5, "both workers' counts")
    assert moved() == len(expected)



def test_after_a_burst_each_record_is_written_before_its_answer(server: Served) -> None:
    """Records wait only for requests still on their way through the app.

    After concurrent load, each worker's backlog (server.WebhookWorker.backlog)
    must be empty again: a client that waits for each answer then finds each
    record already written.  A request never left (a leaked count) makes every
    later record wait for the 50 ms flusher, and this test fail (checked by
    removing the pop).  A request left only after its answer was sent would
    race the client's next request; the worker leaves it before sending, so
    that race cannot happen, but this test would rarely see it.
    """

    def burst(t: int) -> None:
        for i in range(10):
            status, _ = post_review(server.port, server.ctx, admission_review(uid=f"b-{t}-{i}"))
            assert status == 200

    clients = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    conn = https_connection(server.port, server.ctx, timeout=30)
    try:
        for i in range(30):  # one keep-alive connection: the same worker, back to back
            uid = f"sequential-{i}"
            status, _ = post_review(server.port, server.ctx, admission_review(uid=uid), conn=conn)
            assert status == 200
            assert uid in {r["auditID"] for r in server.audit_records()}, uid
    finally:
        conn.close()


def test_metrics_scrape_has_the_documented_names(server: Served) -> None:
    post_review(server.port, server.ctx, admission_review())
    status, text = get(server.config.metrics_port, "/metrics")
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "ecr_webhook_requests", "ecr_webhook_request_duration_seconds",
        "ecr_webhook_requests_in_flight", "ecr_webhook_rewrites",
        "ecr_webhook_policy_reloads", "ecr_webhook_errors", "ecr_webhook_build_info",
        "ecr_webhook_probes",
    } <= names  # fmt: skip
    scrape = metrics(server.config.metrics_port)
    assert sample(scrape, "ecr_webhook_rewrites_total", reason="wrong-account",
                  registry=TARGET_REGISTRY) >= 3  # fmt: skip
    assert sample(scrape, "ecr_webhook_build_info", version="0.1.0") == 1
    # A sample per worker, taken at its last flush (within a second).
    wait_until(lambda: sample(metrics(server.config.metrics_port),
                              "ecr_webhook_requests_in_flight") == 0,
               5, "no request in flight")  # fmt: skip
    assert sample(metrics(server.config.metrics_port), "ecr_webhook_requests_in_flight") == 0
    assert ("ecr_webhook_probes_total", (("outcome", "unauthorized"), ("registry", "other"))) \
        in scrape
    assert get(server.config.metrics_port, "/other")[0] == 404
    # Not on the TLS port.
    assert get(server.port, "/metrics", server.ctx)[0] == 404


# --------------------------------------------------------------------- server B: the CLI


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Started exactly as README.md documents it; one worker, two threads."""
    tmp = tmp_path_factory.mktemp("cli")
    gen = cli(
        "certs",
        "generate",
        "--out-dir",
        "tls",
        "--service",
        "ecr-webhook",
        "--namespace",
        "ecr-webhook",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        cwd=tmp,
    )
    assert gen.returncode == 0, gen.stderr
    assert (tmp / "tls" / "tls.key").stat().st_mode & 0o777 == 0o600
    policy = ConfigMapDir(tmp / "policy")
    policy.update("apiVersion: ecr-webhook.io/v1alpha1\nkind: RewritePolicy\n")
    config = ServeConfig(
        host="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
        cert_file=str(tmp / "tls" / "tls.crt"),
        key_file=str(tmp / "tls" / "tls.key"),
        policy_file=str(policy.path),
        region=REGION,
        audit_log=str(tmp / "audit.log"),
        workers=1,
        threads=2,
    )
    argv = [
        *ecr_webhook(),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(config.port),
        "--metrics-port",
        str(config.metrics_port),
        "--cert-file",
        "tls/tls.crt",
        "--key-file",
        "tls/tls.key",
        "--policy",
        "policy/policy.yaml",
        "--region",
        REGION,
        "--audit-log",
        "audit.log",
        "--workers",
        "1",
        "--threads",
        "2",
    ]
    proc = ServerProcess(argv, cwd=tmp, stderr=tmp / "stderr.log")
    served = Served(tmp, proc, config)
    served.policy = policy  # type: ignore[attr-defined]
    try:
        proc.wait_ready(config.port, served.ctx)
        yield served
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr()
    # Operational logs are klog JSON lines on stderr.
    lines = [json.loads(line) for line in (tmp / "stderr.log").read_text().splitlines()]
    assert all("ts" in line and "msg" in line for line in lines)


def test_cli_certs_generate_then_serve(cli_server: Served) -> None:
    status, doc = post_review(cli_server.port, cli_server.ctx, admission_review(uid="cli"))
    assert status == 200
    assert doc["response"]["patchType"] == "JSONPatch"
    assert get(cli_server.port, "/healthz", cli_server.ctx)[0] == 200
    # The service names are SANs, so an in-cluster name verifies too.
    der = peer_certificate(cli_server.port, cli_server.ctx, host="localhost")
    assert der == ssl.PEM_cert_to_DER_cert((cli_server.tmp / "tls" / "tls.crt").read_text())


def test_idle_tls_connections_do_not_starve_the_threads(cli_server: Served) -> None:
    """Regression for the gthread stall: parked connections must not hold threads.

    Go's HTTP client (the kube-apiserver's) may dial a connection, complete the
    handshake and park it unused.  With two threads, four such connections
    used to block both threads reading requests that never came; a request on
    a fresh connection then waited until the client gave up.
    """
    parked = []
    try:
        for _ in range(4):
            raw = socket.create_connection(("127.0.0.1", cli_server.port), timeout=10)
            parked.append(cli_server.ctx.wrap_socket(raw, server_hostname="localhost"))
        status, _ = post_review(cli_server.port, cli_server.ctx, admission_review(), timeout=10)
        assert status == 200
        # A parked connection is still usable later, like a pooled one.
        conn = parked[0]
        body = json.dumps(admission_review(uid="parked")).encode()
        conn.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)  # fmt: skip
        head = conn.recv(64)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        for s in parked:
            s.close()


def test_certificate_files_swapped_are_served_on_the_next_connection(cli_server: Served) -> None:
    old_ctx = cli_server.ctx
    old_der = peer_certificate(cli_server.port, old_ctx)
    gen = cli("certs", "generate", "--out-dir", "tls", "--dns", "localhost", "--ip", "127.0.0.1",
              cwd=cli_server.tmp)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    new_ctx = apiserver_tls_context(cli_server.tmp / "tls" / "ca.crt")
    new_der = peer_certificate(cli_server.port, new_ctx)
    assert new_der != old_der
    assert new_der == ssl.PEM_cert_to_DER_cert((cli_server.tmp / "tls" / "tls.crt").read_text())
    with pytest.raises(ssl.SSLCertVerificationError):
        peer_certificate(cli_server.port, old_ctx)
    cli_server.ctx = new_ctx
    assert post_review(cli_server.port, new_ctx, admission_review())[0] == 200
    assert get(cli_server.port, "/readyz", new_ctx)[0] == 200


def test_policy_configmap_swap_reloads_and_bad_policy_keeps_last_good(cli_server: Served) -> None:
    policy: ConfigMapDir = cli_server.policy  # type: ignore[attr-defined]
    policy.update(f"kind: RewritePolicy\ntargets: [{{type: mirror, registry: {MIRROR}}}, "
                  "{type: official}]\npreferMirror: true\n")  # fmt: skip
    pod = aws_node_pod()
    _, doc = post_review(cli_server.port, cli_server.ctx, admission_review(pod))
    patched = jsonpatch.apply_patch(pod, decode_patch(doc["response"]))
    assert images(patched)["aws-node"] == f"{MIRROR}/amazon-k8s-cni:v1.19.2-eksbuild.1"
    policy.update("kind: RewritePolicy\ntargets: 3\n")
    _, doc = post_review(cli_server.port, cli_server.ctx, admission_review(pod))
    patched = jsonpatch.apply_patch(pod, decode_patch(doc["response"]))
    assert images(patched)["aws-node"] == f"{MIRROR}/amazon-k8s-cni:v1.19.2-eksbuild.1"
    scrape = metrics(cli_server.config.metrics_port)
    assert sample(scrape, "ecr_webhook_policy_reloads_total", result="success") == 1
    assert sample(scrape, "ecr_webhook_policy_reloads_total", result="failure") == 1
    assert "policy rejected" in (cli_server.tmp / "stderr.log").read_text()
    policy.update("kind: RewritePolicy\n")
    _, doc = post_review(cli_server.port, cli_server.ctx, admission_review(pod))
    assert decode_patch(doc["response"])[0]["value"].startswith(TARGET_REGISTRY)


# --------------------------------------------------------------------- dev mode and failures


def test_serve_dev_generates_a_loopback_certificate_and_prints_the_config(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    proc = ServerProcess([*ecr_webhook(), "serve", "--dev", "--port", str(port),
                          "--metrics-port", str(metrics_port), "--region", REGION],
                         cwd=tmp_path, stderr=tmp_path / "stderr.log")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "certs" / "ca.crt").exists():  # written before serving starts
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.stderr()
            time.sleep(0.05)
        ctx = apiserver_tls_context(tmp_path / "certs" / "ca.crt")
        proc.wait_ready(port, ctx)
        assert post_review(port, ctx, admission_review())[0] == 200
        stderr = proc.stderr()
    finally:
        assert proc.stop() == 0
    doc = yaml.safe_load((tmp_path / "certs" / "mutatingwebhookconfiguration.yaml").read_text())
    hook = doc["webhooks"][0]
    assert doc["kind"] == "MutatingWebhookConfiguration"
    assert hook["name"] == "pods.ecr-webhook.io"
    assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{port}/mutate"
    ca = (tmp_path / "certs" / "ca.crt").read_bytes()
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
    assert f"caBundle: {hook['clientConfig']['caBundle']}" in stderr
    assert "kind: MutatingWebhookConfiguration" in stderr
    assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cert-file", "nope.crt", "--key-file", "nope.key"],
         "--cert-file nope.crt: no such file"),
        (["--policy", "bad.yaml"], "targets"),
        (["--region", "mars-north-1"], "mars-north-1"),
    ],
    ids=["missing-cert", "bad-policy", "bad-region"],
)  # fmt: skip
def test_serve_refuses_bad_configuration_in_one_line(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    assert cli("certs", "generate", "--out-dir", "tls", "--dns", "localhost",
               cwd=tmp_path).returncode == 0  # fmt: skip
    (tmp_path / "bad.yaml").write_text("kind: RewritePolicy\ntargets: []\n")
    base = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--cert-file",
        "tls/tls.crt",
        "--key-file",
        "tls/tls.key",
    ]
    result = cli(*base, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_serve_refuses_a_taken_port(tmp_path: Path) -> None:
    assert cli("certs", "generate", "--out-dir", "tls", "--dns", "localhost",
               cwd=tmp_path).returncode == 0  # fmt: skip
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port",
                     str(port), "--cert-file", "tls/tls.crt", "--key-file", "tls/tls.key",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert f"--metrics-port {port}" in result.stderr


def test_gunicorn_still_has_the_internals_the_worker_relies_on() -> None:
    """WebhookWorker builds on these gthread internals (gunicorn 23+)."""
    from gunicorn.workers import gthread

    for name in ("enqueue_req", "murder_pending", "finish_request", "_keepalive_after",
                 "handle_request", "on_client_socket_readable"):  # fmt: skip
        assert callable(getattr(gthread.ThreadWorker, name)), name
    assert hasattr(gthread.PollableMethodQueue, "defer")
