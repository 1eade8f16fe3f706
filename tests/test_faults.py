"""Faults the served webhook survives (issue 11): an unknown cluster region, a
full audit disk, a deleted or corrupted policy, certificate files replaced by
garbage.  Each is injected into a real server (``ecr-webhook serve``, gunicorn
over TLS on loopback, tests/serving.py); each must keep admissions answered,
be counted in a metric and be logged.

The full disk is real: a 64 KiB tmpfs mounted for the test (root only; the test
says so when it cannot mount), and ``/dev/full`` as the audit stdout, which
fails every write with ENOSPC without any privilege.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.serving import (
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
    images,
    peer_certificate,
    post_review,
)
from tests.test_server import cli, metrics, sample

pytestmark = pytest.mark.slow

UNKNOWN = "ap-southeast-9"  # well-formed, commercial partition, not in the data table
MIRROR = "111122223333.dkr.ecr.ap-southeast-4.amazonaws.com"


class Server:
    def __init__(self, tmp: Path, proc: ServerProcess, port: int, metrics_port: int) -> None:
        self.tmp = tmp
        self.proc = proc
        self.port = port
        self.metrics_port = metrics_port
        self.ctx = apiserver_tls_context(tmp / "tls" / "ca.crt")
        self.policy = ConfigMapDir(tmp / "policy")

    def stderr_lines(self) -> list[dict[str, Any]]:
        text = (self.tmp / "stderr.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def scrape(self, name: str, **labels: str) -> float:
        return sample(metrics(self.metrics_port), name, **labels)


def start(tmp: Path, *extra: str, policy: str | None = None, stdout: Path | None = None,
          audit: str = "audit.log") -> Server:  # fmt: skip
    """``ecr-webhook serve`` as documented, one worker, two threads, in ``tmp``."""
    assert cli("certs", "generate", "--out-dir", "tls", "--dns", "localhost", "--ip",
               "127.0.0.1", cwd=tmp).returncode == 0  # fmt: skip
    port, metrics_port = free_port(), free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--cert-file", "tls/tls.crt",
            "--key-file", "tls/tls.key", "--audit-log", audit, "--workers", "1",
            "--threads", "2", *extra]  # fmt: skip
    holder = ConfigMapDir(tmp / "policy")
    if policy is not None:
        holder.update(policy)
        argv += ["--policy", "policy/policy.yaml"]
    proc = ServerProcess(argv, cwd=tmp, stdout=stdout, stderr=tmp / "stderr.log")
    server = Server(tmp, proc, port, metrics_port)
    server.policy = holder
    proc.wait_ready(port, server.ctx)
    return server


@pytest.fixture(scope="module")
def unknown_region_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("unknown-region")
    server = start(tmp, "--region", UNKNOWN,
                   policy="apiVersion: ecr-webhook.io/v1alpha1\nkind: RewritePolicy\n")  # fmt: skip
    try:
        yield server
    finally:
        assert server.proc.stop() == 0, server.proc.stderr()


# --------------------------------------------------------------------- unknown region


def test_unknown_region_at_start_serves_warns_and_counts(unknown_region_server: Server) -> None:
    """Issue 11: ``serve --region ap-southeast-9`` used to exit 2 (crash loop)."""
    s = unknown_region_server
    assert get(s.port, "/readyz", s.ctx)[0] == 200
    warned = [ln for ln in s.stderr_lines() if "not in the registry data" in ln["msg"]]
    assert warned and warned[0]["region"] == UNKNOWN
    assert s.scrape("ecr_webhook_cluster_region_unknown") == 1
    # Images in known regions are still judged: the wrong account of
    # ap-southeast-4 is fixed within ap-southeast-4.
    pod = aws_node_pod()
    status, doc = post_review(s.port, s.ctx, admission_review(pod))
    assert status == 200
    patched = jsonpatch.apply_patch(pod, decode_patch(doc["response"]))
    assert all(i.startswith(TARGET_REGISTRY + "/") for i in images(patched).values())
    # An image in the unknown region: no account is known there, so it is kept.
    own = aws_node_pod(f"602401143452.dkr.ecr.{UNKNOWN}.amazonaws.com")
    status, doc = post_review(s.port, s.ctx, admission_review(own))
    assert status == 200
    assert "patch" not in doc["response"]


def test_malformed_region_is_still_refused_at_start(tmp_path: Path) -> None:
    assert cli("certs", "generate", "--out-dir", "tls", "--dns", "localhost",
               cwd=tmp_path).returncode == 0  # fmt: skip
    result = cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port",
                 str(free_port()), "--cert-file", "tls/tls.crt", "--key-file", "tls/tls.key",
                 "--region", "moon-1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "moon-1" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------- policy and certificate


def _write_generation(policy: ConfigMapDir, data: bytes) -> None:
    """A ConfigMap update (symlink swap) whose file holds ``data`` (any bytes)."""
    policy.update("placeholder: the bytes follow\n")
    (policy.root / "..data" / policy.key).write_bytes(data)


def test_deleted_or_corrupted_policy_keeps_the_last_good_one(
    unknown_region_server: Server,
) -> None:
    s = unknown_region_server
    pod = aws_node_pod()

    def first_image() -> str:
        status, doc = post_review(s.port, s.ctx, admission_review(pod))
        assert status == 200
        return str(images(jsonpatch.apply_patch(pod, decode_patch(doc["response"])))["aws-node"])

    s.policy.update(f"kind: RewritePolicy\ntargets: [{{type: mirror, registry: {MIRROR}}}, "
                    "{type: official}]\npreferMirror: true\n")  # fmt: skip
    assert first_image().startswith(MIRROR + "/")
    ok = s.scrape("ecr_webhook_policy_reloads_total", result="success")
    failed = s.scrape("ecr_webhook_policy_reloads_total", result="failure")

    # Deleted: the kubelet removes the key's symlink when the key leaves the ConfigMap.
    s.policy.path.unlink()
    assert first_image().startswith(MIRROR + "/")
    assert first_image().startswith(MIRROR + "/")  # counted once per change, not per request
    assert s.scrape("ecr_webhook_policy_reloads_total", result="failure") == failed + 1
    # Corrupted: binary garbage, then a truncated document.
    _write_generation(s.policy, b"\xff\xfe\x00\x9c garbage \x00" * 40)
    assert first_image().startswith(MIRROR + "/")
    _write_generation(s.policy, b"kind: RewritePolicy\ntargets: [{type: mirr")
    assert first_image().startswith(MIRROR + "/")
    assert s.scrape("ecr_webhook_policy_reloads_total", result="failure") == failed + 3
    assert s.scrape("ecr_webhook_errors_total", stage="policy") >= 3
    assert s.scrape("ecr_webhook_policy_reloads_total", result="success") == ok
    assert get(s.port, "/readyz", s.ctx)[0] == 200
    rejected = [ln for ln in s.stderr_lines() if ln["msg"].startswith("policy rejected")]
    assert any("cannot read it" in ln["err"] for ln in rejected)  # deleted
    assert any("not UTF-8" in ln["err"] for ln in rejected)  # binary
    assert any("not valid YAML" in ln["err"] for ln in rejected)  # truncated
    # A good policy again is taken at once.
    s.policy.update("kind: RewritePolicy\n")
    assert first_image().startswith(TARGET_REGISTRY + "/")
    assert s.scrape("ecr_webhook_policy_reloads_total", result="success") == ok + 1


def test_garbage_certificate_files_keep_the_last_good_certificate(
    unknown_region_server: Server,
) -> None:
    s = unknown_region_server
    before = peer_certificate(s.port, s.ctx)
    errors = s.scrape("ecr_webhook_errors_total", stage="certificate")
    crt, key = s.tmp / "tls" / "tls.crt", s.tmp / "tls" / "tls.key"
    good = crt.read_bytes(), key.read_bytes()
    try:
        crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        key.write_bytes(os.urandom(300))
        for _ in range(3):  # new connections, each asking for the context
            assert peer_certificate(s.port, s.ctx) == before
            assert post_review(s.port, s.ctx, admission_review())[0] == 200
        assert get(s.port, "/readyz", s.ctx)[0] == 200
        assert s.scrape("ecr_webhook_errors_total", stage="certificate") >= errors + 1
        assert s.scrape("ecr_webhook_certificate_reloads_total", result="failure") >= 1
        assert s.scrape("ecr_webhook_certificate_reloads_total", result="success") == 0
        lines = [ln for ln in s.stderr_lines() if ln["msg"].startswith("serving certificate rej")]
        assert lines and "cannot load the pair" in lines[-1]["err"]
        # Empty files (a truncated write), and no files at all, too.
        crt.write_bytes(b"")
        key.write_bytes(b"")
        assert peer_certificate(s.port, s.ctx) == before
        crt.unlink()
        key.unlink()
        assert peer_certificate(s.port, s.ctx) == before
        assert post_review(s.port, s.ctx, admission_review())[0] == 200
    finally:
        crt.write_bytes(good[0])
        key.write_bytes(good[1])
    assert peer_certificate(s.port, s.ctx) == before
    assert post_review(s.port, s.ctx, admission_review())[0] == 200


# --------------------------------------------------------------------- audit disk full


def _report_lines(server: Server) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = server.stderr_lines()
    return ([ln for ln in lines if ln["msg"].startswith("audit record not written")],
            [ln for ln in lines if ln["msg"] == "audit records written again"])  # fmt: skip


def _assert_rate_limited(failures: list[dict[str, Any]], elapsed: float) -> None:
    """At most one line per 10 s (one worker): the contract, not a speed."""
    assert 1 <= len(failures) <= 1 + math.ceil(elapsed / 10)


def test_audit_to_dev_full_keeps_serving_reports_and_counts(tmp_path: Path) -> None:
    """stdout is /dev/full: every audit write fails with ENOSPC."""
    server = start(tmp_path, "--region", REGION, audit="-", stdout=Path("/dev/full"))
    try:
        n = 40
        started = time.monotonic()
        for i in range(n):
            status, doc = post_review(server.port, server.ctx, admission_review(uid=f"full-{i}"))
            assert status == 200 and doc["response"]["uid"] == f"full-{i}"
        elapsed = time.monotonic() - started
        assert get(server.port, "/healthz", server.ctx)[0] == 200
        assert server.scrape("ecr_webhook_audit_write_errors_total", errno="ENOSPC") == n
        assert server.scrape("ecr_webhook_errors_total", stage="audit") == n
        assert server.scrape("ecr_webhook_requests_total", code="200", result="patched") == n
        failures, _ = _report_lines(server)
        _assert_rate_limited(failures, elapsed)
        assert "No space left on device" in failures[0]["err"]
        assert sum(ln["heldBack"] for ln in failures) + len(failures) <= n
    finally:
        assert server.proc.stop() == 0, server.proc.stderr()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted afterwards (needs root, as in CI and on the dev machine)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)


def test_audit_file_on_a_full_disk_keeps_serving_and_stays_whole(
    tmp_path: Path, tiny_disk: Path
) -> None:
    """A real ENOSPC: records before, during and after the disk is full.

    Linux writes what fits before failing, so a record can be cut in the middle;
    the writer removes its fragment, and the file holds whole records only.
    """
    audit = tiny_disk / "audit.log"
    server = start(tmp_path, "--region", REGION, audit=str(audit))
    try:
        uids = [str(uuid.uuid4()) for _ in range(60)]
        for uid in uids[:3]:
            assert post_review(server.port, server.ctx, admission_review(uid=uid))[0] == 200
        _fill(tiny_disk / "filler")
        started = time.monotonic()
        for uid in uids[3:50]:
            assert post_review(server.port, server.ctx, admission_review(uid=uid))[0] == 200
        elapsed = time.monotonic() - started
        lost = server.scrape("ecr_webhook_audit_write_errors_total", errno="ENOSPC")
        assert lost >= 40  # a record or two may still fit in the file's last page
        failures, _ = _report_lines(server)
        _assert_rate_limited(failures, elapsed)
        (tiny_disk / "filler").unlink()
        for uid in uids[50:]:
            assert post_review(server.port, server.ctx, admission_review(uid=uid))[0] == 200
        # Every line is a whole record, every admission is either recorded or counted lost.
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        assert len(records) + lost == len(uids)
        assert len({r["auditID"] for r in records}) == len(records)
        assert {r["auditID"] for r in records} >= set(uids[:3]) | set(uids[50:])
        _, recovered = _report_lines(server)
        assert recovered and recovered[0]["lost"] == lost
    finally:
        assert server.proc.stop() == 0, server.proc.stderr()


def test_a_write_cut_short_by_a_full_disk_leaves_no_fragment(tiny_disk: Path) -> None:
    """AuditLog alone on the tiny disk: records of 1000 bytes never fill a 4 KiB page
    exactly, so the write that hits the end of the disk is a short write."""
    from webhook.auditlog import AuditLog

    log = AuditLog(str(tiny_disk / "audit.log"), max_bytes=0)
    written = 0
    with pytest.raises(OSError) as info:
        while True:
            log.write({"n": written, "pad": "x" * 980})
            written += 1
    assert info.value.errno == 28
    log.close()
    lines = (tiny_disk / "audit.log").read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a whole line
    assert [json.loads(x)["n"] for x in lines[:-1]] == list(range(written))
    assert written >= 50  # most of the 64 KiB was used


def test_a_policy_reload_into_an_unknown_region_is_counted(tmp_path: Path) -> None:
    """The region may also arrive with a policy update: the gauge follows it."""
    server = start(tmp_path, policy="kind: RewritePolicy\nregion: ap-southeast-4\n")
    try:
        assert server.scrape("ecr_webhook_cluster_region_unknown") == 0
        server.policy.update(f"kind: RewritePolicy\nregion: {UNKNOWN}\n")
        assert post_review(server.port, server.ctx, admission_review())[0] == 200
        assert server.scrape("ecr_webhook_cluster_region_unknown") == 1
        assert server.scrape("ecr_webhook_policy_reloads_total", result="success") == 1
        server.policy.update("kind: RewritePolicy\nregion: ap-southeast-4\n")
        assert post_review(server.port, server.ctx, admission_review())[0] == 200
        assert server.scrape("ecr_webhook_cluster_region_unknown") == 0
        warned = [ln for ln in server.stderr_lines() if "not in the registry data" in ln["msg"]]
        assert [ln["region"] for ln in warned] == [UNKNOWN]
    finally:
        assert server.proc.stop() == 0, server.proc.stderr()


def test_the_report_throttle_counts_what_it_holds_back() -> None:
    """The rate limit of the disk-full report, on an injected clock."""
    from webhook.logs import Throttle

    now = [100.0]
    t = Throttle(10.0, clock=lambda: now[0])
    assert not t.pending
    assert t.due() == (True, 0)  # the first failure is reported at once
    assert [t.due() for _ in range(5)] == [(False, 0)] * 5
    now[0] += 10
    assert t.due() == (True, 5)  # the next report carries what was held back
    assert t.pending
    assert t.settle() == 7  # every failure since the writes last worked
    assert not t.pending
    assert t.due() == (True, 0)  # a new outage is reported at once
