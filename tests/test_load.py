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
    Served,
    admission_review,
    aws_node_pod,
    served,
)

pytestmark = pytest.mark.slow




@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    with served(tmp_path) as srv:
        yield srv


@pytest.mark.parametrize("connections", [128, 512])
def test_a_storm_of_keep_alive_tls_connections_is_answered_without_timeouts(
    server: Served, connections: int
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


def test_a_short_soak_loses_no_record_and_does_not_grow(server: Served) -> None:
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
