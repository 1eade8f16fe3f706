"""Load held, in CI (issue 11, item 4): storms, a short soak, audit completeness.

The real server (``ecr-webhook serve``, default ``--workers 2 --threads 8``, TLS
on loopback).  The full figures come from ``bench/load.py`` (storms of 10 s,
a 10-minute soak); these are the short variants, with assertions only on
outcomes, never on speed:

* storms of 128 and 512 concurrent keep-alive TLS connections (``hey``): every
  request answered 200 within the client timeout of 10 s (the kube-apiserver's
  default webhook ``timeoutSeconds``), zero timeouts, zero errors;
* 200 admissions/s for 20 s after a warm-up, each with its own uid: zero
  errors, RSS of master and workers grows less than 10 %, and the audit log
  holds exactly one record per admission answered.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loadgen import audit_ids, body_template, hey, paced, rss_kib
from tests.serving import (
    REGION,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    aws_node_pod,
    ecr_webhook,
    free_port,
)
from webhook import certs

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, tmp: Path, proc: ServerProcess, port: int) -> None:
        self.tmp, self.proc, self.port = tmp, proc, port
        self.ctx = apiserver_tls_context(tmp / "ca.crt")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp_path)
    port = free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(free_port()), "--cert-file", str(tmp_path / "tls.crt"),
            "--key-file", str(tmp_path / "tls.key"), "--region", REGION,
            "--audit-log", str(tmp_path / "audit.log")]  # fmt: skip
    proc = ServerProcess(argv, stderr=tmp_path / "stderr.log")
    srv = Server(tmp_path, proc, port)
    try:
        proc.wait_ready(port, srv.ctx)
        yield srv
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr()


@pytest.mark.parametrize("connections", [128, 512])
def test_a_storm_of_keep_alive_tls_connections_is_answered_without_timeouts(
    server: Server, connections: int
) -> None:
    assert shutil.which("hey"), "hey is installed by .ci/run (apt-get install -y hey)"
    body = server.tmp / "review.json"
    body.write_text(json.dumps(admission_review(aws_node_pod())))
    result = hey(server.port, body, seconds=5, connections=connections, timeout=10)
    assert result.ok > 0, result
    assert result.errors == {}, result.errors  # timeouts and resets would be listed here
    assert result.non_200 == 0, result.statuses
    # Every answer has its record (hey's body repeats one uid, so count lines here;
    # uniqueness is the soak's job below).
    server.proc.stop()
    assert len(audit_ids(server.tmp / "audit.log")) == result.ok


def test_a_short_soak_loses_no_record_and_does_not_grow(server: Server) -> None:
    template = body_template(admission_review(aws_node_pod()))
    warm = paced(server.port, server.ctx, template, rate=200, seconds=5, prefix="warm")
    assert not warm.errors, warm.errors[:3]
    rss_start = rss_kib(server.proc.proc.pid)
    soak = paced(server.port, server.ctx, template, rate=200, seconds=20, prefix="soak")
    rss_end = rss_kib(server.proc.proc.pid)
    assert soak.errors == [], soak.errors[:3]
    assert soak.sent == len(soak.answered) > 0
    assert rss_start > 0
    assert (rss_end - rss_start) / rss_start < 0.10, (rss_start, rss_end)
    server.proc.stop()
    ids = audit_ids(server.tmp / "audit.log")
    answered = warm.answered + soak.answered
    assert len(ids) == len(set(ids)), "a uid has more than one record"
    assert sorted(ids) == sorted(answered)
