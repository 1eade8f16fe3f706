"""Slow and stalled clients cannot stop the server (issue 11, item 1).

The real server (``ecr-webhook serve`` under gunicorn, TLS on loopback) with the
settings the issue found stalled: ``--workers 2 --threads 8``.  Before the fix,
16 connections sending headers with ``Content-Length: 1000`` and 6 bytes of
body held every thread; the next handshake, admission and ``/healthz`` went
unanswered for minutes.  Here 64 stalled connections (bodies, headers and
handshakes that stop half-way) are held open while valid admissions and
``/healthz`` must be answered within the kube-apiserver's timeout for this
webhook (``timeoutSeconds: 5`` in manifests/; the client gives up after it),
and the stalled connections must then be closed by the server once their
deadline (``--read-timeout 2``; 10 s for a handshake) has passed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from tests.serving import (
    Served,
    admission_review,
    get,
    post_review,
    served,
    settled,
    wait_until,
)

pytestmark = pytest.mark.slow

# The kube-apiserver waits timeoutSeconds for the webhook (manifests: 5).
APISERVER_TIMEOUT = 5
READ_TIMEOUT = 2
HANDSHAKE_TIMEOUT = 10  # webhook.server.HANDSHAKE_TIMEOUT (Go's TLSHandshakeTimeout)




@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("slow"), "--workers", "2", "--threads", "8",
                "--read-timeout", str(READ_TIMEOUT)) as srv:  # fmt: skip
        yield srv


def assert_admissions_answered(server: Served, prefix: str, n: int) -> None:
    """``n`` admissions, each allowed with its own uid within the apiserver's timeout."""
    for i in range(n):
        status, doc = post_review(server.port, server.ctx, admission_review(uid=f"{prefix}-{i}"),
                                  timeout=APISERVER_TIMEOUT)  # fmt: skip
        assert status == 200
        assert doc["response"]["uid"] == f"{prefix}-{i}"
        assert doc["response"]["allowed"] is True


def request_head(length: int, *, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length
    return (b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + framing + b"\r\n\r\n")  # fmt: skip


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and its Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))  # fmt: skip
    while len(body) < length:
        more = sock.recv(65536)
        assert more, data
        body += more
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return True
    except TimeoutError:
        return False
    except ssl.SSLError:
        return True  # the server's alert or a torn record: the connection is gone


def test_64_stalled_connections_do_not_stop_admissions_or_healthz(server: Served) -> None:
    stalled: list[tuple[str, socket.socket]] = []
    try:
        for _ in range(32):  # headers with Content-Length: 1000, then 6 bytes of body
            s = server.tls()
            s.sendall(request_head(1000) + b'{"api')
            stalled.append(("body", s))
        for _ in range(16):  # half a header section
            s = server.tls()
            s.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Le")
            stalled.append(("header", s))
        for _ in range(16):  # a TLS record header, and then nothing: a stalled handshake
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            raw.sendall(b"\x16\x03\x01\x02\x00\x01")
            stalled.append(("handshake", raw))
        assert len(stalled) == 64
        # While all 64 are open and stalled, the server answers within the apiserver's timeout.
        assert_admissions_answered(server, "during", 16)
        assert get(server.port, "/healthz", server.ctx, timeout=APISERVER_TIMEOUT)[0] == 200
        # Every stalled connection is then dropped by the server after its deadline
        # (generous bounds: the deadline, plus the poller's 1 s tick, plus slack).
        for kind, s in stalled:
            limit = (HANDSHAKE_TIMEOUT if kind == "handshake" else READ_TIMEOUT) + 10
            assert closed_by_server(s, limit), kind
    finally:
        for _, s in stalled:
            s.close()
    assert post_review(server.port, server.ctx, admission_review(),
                       timeout=APISERVER_TIMEOUT)[0] == 200  # fmt: skip


def test_a_body_arriving_in_pieces_within_the_deadline_is_served(server: Served) -> None:
    body = json.dumps(admission_review(uid="pieces")).encode()
    with server.tls() as s:
        s.sendall(request_head(len(body)))
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.1)
            s.sendall(body[i:i + len(body) // 4 + 1])
        s.settimeout(APISERVER_TIMEOUT)
        assert s.recv(64).startswith(b"HTTP/1.1 200")


def test_chunked_and_pipelined_requests_are_framed_and_served(server: Served) -> None:
    body = json.dumps(admission_review(uid="chunked")).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                      for i in range(0, len(body), 1000))  # fmt: skip
    chunked = request_head(0, chunked=True) + chunks + b"0\r\n\r\n"
    plain = json.dumps(admission_review(uid="pipelined")).encode()
    with server.tls() as s:
        s.sendall(chunked + request_head(len(plain)) + plain)  # two requests, one write
        s.settimeout(APISERVER_TIMEOUT)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}"):
            data = s.recv(65536)
            assert data, received
            received += data
    assert b'"uid":"chunked"' in received
    assert b'"uid":"pipelined"' in received


def test_a_request_stalled_after_the_handshake_on_a_kept_alive_connection_is_dropped(
    server: Served,
) -> None:
    """The deadline applies to every request of a connection, not only the first."""
    body = json.dumps(admission_review()).encode()
    with server.tls() as s:
        s.sendall(request_head(len(body)) + body)
        s.settimeout(APISERVER_TIMEOUT)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        s.recv(1 << 20)  # the rest of the answer
        s.sendall(request_head(1000) + b"{")
        assert closed_by_server(s, READ_TIMEOUT + 10)


def test_a_chunked_body_over_the_limit_gets_413_like_a_declared_one(server: Served) -> None:
    """Issue 11, item 3: chunked bodies used to be cut at 7 MiB and answered 400."""
    from webhook.config import MAX_BODY

    big = admission_review()
    big["request"]["object"]["metadata"]["annotations"] = {"x": "y" * (MAX_BODY + 1024)}
    body = json.dumps(big).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                      for i in range(0, len(body), 65536)) + b"0\r\n\r\n"  # fmt: skip
    with server.tls() as s:
        s.sendall(request_head(0, chunked=True) + chunks)
        s.settimeout(APISERVER_TIMEOUT)
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    status_doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert status_doc["code"] == 413 and status_doc["reason"] == "RequestEntityTooLarge"
    assert "chunked body is over the limit" in status_doc["message"]
    assert b"Connection: close" in answer.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_body_over_the_limit_is_answered_413_before_it_is_sent(
    server: Served, chunked: bool
) -> None:
    """The worker answers as soon as the limit is known to be crossed: the client
    has sent only the header section (and a chunk size), none of the body."""
    from webhook.config import MAX_BODY

    refused = 'ecr_webhook_requests_total{code="413",result="rejected"}'
    before = settled(lambda: server.metric(refused))
    head = request_head(MAX_BODY + 1, chunked=chunked)
    if chunked:
        head += b"%x\r\n" % (MAX_BODY + 1)
    with server.tls() as s:
        s.sendall(head)
        s.settimeout(APISERVER_TIMEOUT)
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        status_doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert status_doc["kind"] == "Status" and status_doc["code"] == 413
        assert str(MAX_BODY) in status_doc["message"]
        # The connection lingers, dropping what still arrives, then closes.
        s.sendall(b"x" * 65536)
        assert closed_by_server(s, READ_TIMEOUT + 10)
    # Counted by the worker that answered; a scrape sees it within a second.
    wait_until(lambda: server.metric(refused) >= before + 1, 5, "the 413 counted")
    assert server.metric(refused) == before + 1


def _trickle(socks: list[ssl.SSLSocket], stop: threading.Event) -> None:
    """One byte to each socket every half second until ``stop``: a client sending slowly."""
    while not stop.wait(0.5):
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"x")


@pytest.mark.parametrize("shape", [
    "huge-header",
    "huge-chunk",
    "huge-length",
])
def test_requests_handed_to_threads_cannot_be_trickled_into_holding_them(
    server: Served, shape: str
) -> None:
    """Found in review: a request the worker hands over unframed (a header section
    over its limit, a chunk size over the body limit) was then read on a thread
    with only a per-read timeout, so one byte every half second held the thread.
    16 such connections (every thread of --workers 2 --threads 8) must not stop
    admissions, and each is answered or dropped after the read timeout.

    Found next: a body over the limit (a chunk size over it, or a declared
    Content-Length over it) went to a thread so that the app could answer 413,
    and gunicorn's body readers then waited, a byte at a time, for the rest.
    The worker now answers those 413 itself, from its poller, at once."""
    if shape == "huge-header":  # 70 KB of fields, within gunicorn's limits, never ending
        pad = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"p" * 1000) for i in range(70))
        head = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n" + pad
    elif shape == "huge-chunk":  # a 64 MiB chunk announced, then a trickle
        head = request_head(0, chunked=True) + b"4000000\r\n"
    else:  # a body over the limit declared, then a trickle
        head = request_head(8 * 1024 * 1024)
    socks = []
    stop = threading.Event()
    feeder = threading.Thread(target=_trickle, args=(socks, stop), daemon=True)
    try:
        for _ in range(16):
            s = server.tls()
            s.sendall(head)
            socks.append(s)
        feeder.start()
        time.sleep(1)
        assert_admissions_answered(server, shape, 8)
        for s in socks:
            assert closed_or_answered(s, READ_TIMEOUT + 10), shape
        if shape != "huge-header":
            refused = 'ecr_webhook_requests_total{code="413",result="rejected"}'
            wait_until(lambda: server.metric(refused) >= 16, 5, "the 413s counted")
            assert server.metric(refused) >= 16
    finally:
        stop.set()
        for s in socks:
            s.close()


def closed_or_answered(sock: ssl.SSLSocket, within: float) -> bool:
    """Whether the server answers (a 4xx) or closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        data = sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return not data or data.startswith(b"HTTP/1.1 4")


# gunicorn's worker_connections default: the connections one worker holds at most.
WORKER_CONNECTIONS = 1000


def test_idle_connections_at_the_limit_are_closed_longest_idle_first(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """More idle TLS connections than one worker's ``worker_connections`` (1000):
    the worker closes the longest idle to accept again, so a new connection's
    admission and ``/healthz`` are still answered, and a connection in use keeps
    its slot.  Before, the 1001st connection waited in the listen backlog for the
    keep-alive timeout (120 s) of the idle ones."""
    with served(tmp_path_factory.mktemp("limit"), "--workers", "1", "--threads", "2") as srv:
        idle: list[ssl.SSLSocket] = []
        try:
            in_use = srv.tls()
            in_use.settimeout(APISERVER_TIMEOUT)
            body = json.dumps(admission_review(uid="in-use")).encode()
            request = request_head(len(body)) + body

            def use() -> None:
                in_use.sendall(request)
                assert read_response(in_use).startswith(b"HTTP/1.1 200")

            use()
            for i in range(WORKER_CONNECTIONS + 100):
                # A handshake that stalls (no slot frees) times out here: the old behaviour.
                idle.append(srv.tls(timeout=APISERVER_TIMEOUT))
                if i % 100 == 0:
                    use()  # the connection in use is never the longest idle
            assert_admissions_answered(srv, "at-limit", 4)
            assert get(srv.port, "/healthz", srv.ctx, timeout=APISERVER_TIMEOUT)[0] == 200
            use()  # still open: it was not closed for the newer idle ones
            # The first 100 idle connections were the longest idle: closed by the server.
            assert all(closed_by_server(s, 2) for s in idle[:100])
            # The newest were kept.
            assert not any(closed_by_server(s, 0.2) for s in idle[-20:])
        finally:
            for s in idle:
                s.close()
        stderr = srv.proc.stderr()
    assert "connection limit (1000) reached: closed" in stderr, stderr[-2000:]
