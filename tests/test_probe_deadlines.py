"""Hard deadlines of the prober's network calls (README "Known gaps", issue 11).

Two bounds:

* every HTTP exchange with a registry (the manifest HEAD, the anonymous
  bearer-token GET) ends at the probe's own time limit even when the registry
  sends one byte every 0.2 s, which resets urllib3's per-read timeout forever;
  the probe is ``unreachable`` / ``timed out``, as a hung registry's is, and the
  probe-pool thread is free again;
* with IRSA (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``) the STS call
  botocore makes inside the ECR token call has the token call's timeouts and
  one attempt, not botocore's 60 s and legacy retries.

Fault injectors, said plainly: ``Trickler`` is a small socket server, not a
registry.  Debian's ``docker-registry`` cannot be made to trickle its answer,
so this server plays a registry (or its token endpoint) whose bytes come one
at a time, for longer than any test waits.  The hung STS endpoint is
``HungServer`` (tests/registry_support.py: accepts, never answers).  The real
parts are the healthy registry (Debian's ``docker-registry``, ``good_registry``)
and moto in server mode for the ECR and STS APIs.

No test asserts speed: the trickling probes are asserted by their outcome and
by the pool's only thread being free for the next probe; the hung STS case by
the token call having returned at all within three times its limit (botocore's
defaults would hold it for minutes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_conftest import CNI_TAG
from tests.registry_support import (
    CertAuthority,
    HungServer,
    MotoServer,
    Registry,
    eks_registry_host,
)
from webhook import prober as prober_module
from webhook.core.imageref import parse
from webhook.core.probing import Outcome, Probe
from webhook.prober import Prober, ProberSettings

pytestmark = pytest.mark.slow

USW2 = eks_registry_host("us-west-2")
TRICKLE = "trickle.example.com"
BYTE_EVERY = 0.2  # seconds between two bytes of the trickling answer
LIMIT_BUDGET = 1.0  # the trickling probe's admission budget: its own limit is 0.8 s
WAIT_BUDGET = 10.0  # the following probe waits this long for the pool's only thread


class Trickler:
    """Fault injector: a "registry" that answers one byte every ``BYTE_EVERY`` seconds.

    ``mode``:

    - ``"headers"``: the answer to any request is a status line and a header
      that never ends, byte by byte (the manifest HEAD trickles);
    - ``"body"``: a manifest request gets ``401`` with a Bearer challenge whose
      realm is this server's ``/token``, at once; ``/token`` gets ``200`` with
      ``Content-Length: 1000000`` and then its body byte by byte (the
      anonymous token GET trickles);
    - ``"handshake"`` (TLS only): the server's TLS handshake flight itself is
      sent byte by byte (via ``ssl.MemoryBIO``), about 1 KiB: minutes.

    ``tls``: a server context (TLS), or None (plain HTTP).  ``sent`` counts the
    bytes trickled, ``connections`` the connections accepted.
    """

    def __init__(self, mode: str, tls: ssl.SSLContext | None) -> None:
        self.mode = mode
        self.tls = tls
        self.sent = 0
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _drip(self, send: object, data: bytes) -> bool:
        """Send ``data`` one byte at a time; False once stopped or the peer is gone."""
        assert callable(send)
        for i in range(len(data)):
            if self._stop.wait(BYTE_EVERY):
                return False
            try:
                send(data[i : i + 1])
            except (OSError, ssl.SSLError):
                return False
            with self._lock:
                self.sent += 1
        return True

    def _serve(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            if self.mode == "handshake":
                self._slow_handshake(raw)
                return
            conn = self.tls.wrap_socket(raw, server_side=True) if self.tls else raw
            while not self._stop.is_set():
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                path = head.split(b" ", 2)[1]
                if self.mode == "headers":
                    self._drip(conn.sendall, b"HTTP/1.1 200 OK\r\nX-Trickle: " + b"a" * 10**6)
                    return
                if not path.startswith(b"/token"):
                    realm = f"{self.url}/token"
                    conn.sendall(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                        b'WWW-Authenticate: Bearer realm="' + realm.encode()
                        + b'",service="trickle"\r\n\r\n'
                    )  # fmt: skip
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000\r\n\r\n")  # fmt: skip
                self._drip(conn.sendall, b'{"token": "' + b"t" * 10**6)
                return

    def _slow_handshake(self, raw: socket.socket) -> None:
        assert self.tls is not None
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.tls.wrap_bio(incoming, outgoing, server_side=True)
        raw.settimeout(30)
        incoming.write(raw.recv(16384))  # the ClientHello
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        self._drip(raw.sendall, outgoing.read())

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()


@pytest.fixture
def aws_moto(moto_ecr: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """os.environ for boto3 in this process: moto's ECR API, fake static keys, no files."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_ECR", moto_ecr.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_ecr


@pytest.fixture
def irsa(aws_moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """IRSA's environment (what EKS's pod identity webhook injects), no static keys.

    The token file holds a JWT-shaped string; moto does not verify it.  The
    test sets ``AWS_ENDPOINT_URL_STS`` (botocore's service-specific endpoint).
    """
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/ecr-webhook")
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "ecr-webhook-test")
    return token


@pytest.fixture
def trickler(request: pytest.FixtureRequest, registry_ca: CertAuthority) -> Iterator[Trickler]:
    mode, scheme = request.param
    tls = registry_ca.server_context(f"trickle-{mode}") if scheme == "https" else None
    server = Trickler(mode, tls)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------- trickling registries


@pytest.mark.parametrize(
    "trickler",
    [("headers", "http"), ("headers", "https"), ("body", "http"), ("body", "https"),
     ("handshake", "https")],
    ids=["head-headers-http", "head-headers-tls", "token-body-http", "token-body-tls",
         "tls-handshake"],
    indirect=True,
)  # fmt: skip
def test_trickling_registry_times_out_and_frees_the_pool_thread(
    trickler: Trickler, good_registry: Registry, registry_ca: CertAuthority, aws_moto: MotoServer,
) -> None:
    """A registry trickling its answer is ``unreachable`` (timed out) at the probe's
    limit, and the pool's only thread then probes a healthy registry.

    Before the hard deadline the thread stayed in the trickling read for as long
    as the bytes came (urllib3's read timeout is per read), so the following
    probe never ran: ``no-answer``.
    """
    slow = parse(f"{TRICKLE}/eks/pause:3.10")
    healthy = parse(f"{USW2}/amazon-k8s-cni:{CNI_TAG}")
    p = Prober(ProberSettings(endpoints={TRICKLE: trickler.url, USW2: good_registry.url},
                              ca_file=str(registry_ca.ca_file), concurrency=1))  # fmt: skip
    try:
        p.prepare([healthy])  # boto3's start-up and moto's token, outside any budget
        first = p.probe_all([slow], budget=LIMIT_BUDGET)[str(slow)]
        assert first.outcome in (Outcome.UNREACHABLE, Outcome.NO_ANSWER), first
        # One pool thread: this probe runs only once the trickling one has ended.
        after = p.probe_all([healthy], budget=WAIT_BUDGET)[str(healthy)]
        assert after.outcome is Outcome.AVAILABLE, after
        again = p.probe_all([slow], budget=LIMIT_BUDGET)[str(slow)]
    finally:
        p.close()
    # The trickling probe finished (its answer was cached) as a timeout.
    assert again.cached is True
    assert again.outcome is Outcome.UNREACHABLE
    assert again.detail in ("timed out", "token: timed out", "TLS: timed out"), again.detail
    assert trickler.sent >= 1  # the fault was met: bytes were trickled


# ------------------------------------------------------------- IRSA: STS inside the token call


def test_irsa_sts_from_moto_gives_the_ecr_token(
    irsa: Path, aws_moto: MotoServer, good_registry: Registry, registry_ca: CertAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With only IRSA's web identity configured, the prober's ECR client gets its
    credentials from STS (moto) and the probe is answered with the token."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", aws_moto.url)
    healthy = parse(f"{USW2}/amazon-k8s-cni:{CNI_TAG}")
    p = Prober(ProberSettings(endpoints={USW2: good_registry.url},
                              ca_file=str(registry_ca.ca_file)))  # fmt: skip
    try:
        p.prepare([healthy])  # the STS and token calls, outside the budget
        got = p.probe_all([healthy], budget=3.0)[str(healthy)]
    finally:
        p.close()
    assert got.outcome is Outcome.AVAILABLE, got


def test_irsa_hung_sts_fails_the_token_call_within_its_limit(
    irsa: Path, hung_registry: HungServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STS that accepts and never answers: the token call fails after about its
    own limit (one attempt), and the probe is ``no-answer`` naming the token.

    The limit is lowered to 1 s for the test (``TOKEN_TIMEOUT``, which the
    prober hands to its real client factory); botocore's defaults (60 s
    connect and read, legacy retries: 5 attempts) would hold it for minutes.
    """
    limit = 1.0
    monkeypatch.setattr(prober_module, "TOKEN_TIMEOUT", limit)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{hung_registry.port}")
    accepted = hung_registry.count
    ref = parse(f"{USW2}/amazon-k8s-cni:{CNI_TAG}")
    p = Prober(ProberSettings(endpoints={USW2: "https://127.0.0.1:9"}))
    answers: list[object] = []
    # The boto3 client is made first: its start-up is not the call under test.
    p._client("us-west-2")
    caller = threading.Thread(target=lambda: answers.append(p.probe_now(ref, 1.0)),
                              daemon=True)  # fmt: skip
    caller.start()
    caller.join(3 * limit)
    try:
        assert not caller.is_alive(), "the token call is still waiting on the hung STS"
        (probe,) = answers
        assert isinstance(probe, Probe)
        assert probe.outcome is Outcome.NO_ANSWER
        assert probe.detail.startswith("token: "), probe.detail
        assert hung_registry.count == accepted + 1  # STS was asked, once
    finally:
        p.close()
