"""``ecr-webhook serve``: gunicorn, embedded, serving the app over TLS.  A shell module.

``run(config) -> int`` validates everything it can before forking (certificate
pair, policy, region, audit target, ports), so a mistake is one line naming the
flag and the value, then starts gunicorn through a ``BaseApplication`` (no
config file, no ``gunicorn`` command line).

What the launcher sets up, and why:

* **TLS**, 1.2 minimum, through gunicorn's ``ssl_context`` hook.  gunicorn asks
  the hook for a context on every new connection; the hook answers from a
  ``CertificateHolder`` that re-reads the certificate and key when the files
  change (a Secret update is a symlink swap), so rotation needs no restart and
  the next connection already shows the new certificate.
* **The worker**: ``WebhookWorker``, gunicorn's threaded worker with the TLS
  handshake and the reading of each request moved into its poller.  Stock
  ``gthread`` completes a new connection's handshake in a pool thread and
  then blocks that thread reading the request.  Go's HTTP client (the
  kube-apiserver's) dials extra connections under load and parks the ones it
  does not need, and a slow or hostile client may send a request's headers
  and then stall in its body: either way a thread waits on a client, and once
  such connections outnumber the threads the worker stops answering (measured
  by bench/load.py: 128 keep-alive connections against 2x8 threads; and 16
  connections sending ``Content-Length: 1000`` and 6 bytes, issue 11).
  ``WebhookWorker`` hands a thread only a request that has fully arrived;
  the handshake (10 s, Go's default TLSHandshakeTimeout) and each request
  (``--read-timeout``, from its first byte) have deadlines, after which the
  connection is closed.  See the class docstring for why not socket timeouts.
* **keep-alive 120 s**: longer than the kube-apiserver's idle timeout for
  webhook connections (90 s, Go's http.DefaultTransport IdleConnTimeout, which
  k8s.io/apimachinery's SetTransportDefaults copies), so the client always
  closes an idle connection first and never sends a request into a connection
  the server is closing.  An idle connection costs a file descriptor, no thread.
* **Metrics** on a separate plain-HTTP port.  The launcher binds the listening
  socket once, before forking; every worker serves it from a small thread, and
  any worker answers a scrape with the sum over all workers (prometheus_client
  multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` in a private temporary
  directory, set before prometheus_client creates a value).
* **Logs**: gunicorn's own messages in the klog JSON format on stderr; stdout
  carries only audit records.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import glob
import heapq
import os
import selectors
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from gunicorn import http as ghttp
from gunicorn import sock as gsock
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornBaseLogger
from gunicorn.workers import gthread

from webhook import certs, logs
from webhook.auditlog import AuditLog
from webhook.config import MAX_BODY, ServeConfig
from webhook.core import jsonc, review
from webhook.core.ecr import DATA_VERSION
from webhook.core.errors import ConfigError
from webhook.core.framing import Frame, RequestScanner
from webhook.core.policy import unknown_region
from webhook.reload import (
    UNKNOWN_REGION_MESSAGE,
    CertificateHolder,
    build_context,
    load_certificate,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KEEPALIVE_SECONDS = 120
# Go's crypto/tls client gives up a handshake after 10 s (net/http
# DefaultTransport TLSHandshakeTimeout); a server thread need not wait longer.
HANDSHAKE_TIMEOUT = 10
GRACEFUL_TIMEOUT = 20  # below the pod's default terminationGracePeriodSeconds (30)
DEV_CERT_DIR = "certs"
WEBHOOK_NAME = "pods.ecr-webhook.io"

WSGIApp = Callable[..., Any]
AppFactory = Callable[[ServeConfig], WSGIApp]


# --------------------------------------------------------------------------- worker

# Bytes one connection may read per poller turn, so a fast large body does not
# keep the poller from the other connections (the rest is read on a later turn).
_STEP_BYTES = 256 * 1024


# After the worker's own 413, the rest of the body is read and dropped for at
# least this long, so the answer is not lost to the reset a close with unread
# bytes causes (RFC 9112 section 9.6: close in stages; nginx's lingering_close).
_LINGER_SECONDS = 1.0

# At the connection limit, idle connections closed per turn of the poller (as
# nginx's ngx_drain_connections), and how often that is reported.
_EVICT_BATCH = 32
_EVICT_REPORT_SECONDS = 10


class _Reading:
    """A connection the poller is reading a request from (no thread holds it).

    ``out`` holds answer bytes not yet sent and ``refused`` is set once the
    worker has answered the request itself (413): from then on what arrives is
    dropped until the client closes or the deadline passes.
    """

    __slots__ = ("buf", "deadline", "out", "refused", "scanner", "since")

    def __init__(self, scanner: RequestScanner, deadline: float, since: float) -> None:
        self.buf = bytearray()
        self.deadline = deadline
        self.since = since  # when the connection was accepted or its last answer sent
        self.scanner = scanner
        self.out = b""
        self.refused = False


def too_large_answer(message: str) -> bytes:
    """The worker's 413: a Kubernetes ``Status``, and the connection closes after it."""
    body = jsonc.dumps(review.status_document(413, message))
    head = (
        "HTTP/1.1 413 Request Entity Too Large\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class WebhookWorker(gthread.ThreadWorker):  # type: ignore[misc]
    """gthread, with the TLS handshake and the whole request read in the poller.

    Threads only ever serve requests that have fully arrived; everything a
    client can be slow at happens in the worker's main loop (its poller),
    non-blocking, under a deadline:

    * the TLS handshake, within ``HANDSHAKE_TIMEOUT`` of the accept;
    * an idle connection (kept alive, or handshaken and parked by Go's HTTP
      client), up to the keep-alive timeout, as gthread does;
    * a request, headers and body (``Content-Length`` or chunked), within
      ``read_timeout`` seconds of its first byte.

    A connection past its deadline is closed, and at ``worker_connections``
    the connections idle longest are closed to make room (``_evict_idle``).
    Why this and not socket
    timeouts on gthread's threads: a timeout still holds the thread until it
    expires, so ``threads`` stalled clients stop the worker for
    ``read_timeout`` seconds at a time, and a client that keeps re-opening
    them stops it for good; here a stalled client costs a file descriptor
    and a few bytes of buffer.  The framing (where a request ends) is the
    pure ``webhook.core.framing.RequestScanner``; a request it cannot frame
    is handed to a thread at once so that gunicorn answers it (400), with
    ``read_timeout`` on each socket read and write of that thread.  A body
    over the limit is answered 413 here, in the poller, as soon as the limit is
    known to be crossed; the rest is read and dropped until the deadline, so
    a client trickling a huge body holds no thread (issue 11).  The app's
    ``refused`` hook (``app.extensions["ecr_webhook"]``) counts it.

    ``read_timeout`` and ``max_body`` are class attributes: ``make_worker``
    builds the subclass ``serve`` runs.
    """

    read_timeout: float = 5.0
    max_body: int = 7 * 1024 * 1024
    wsgi: Callable[..., Any]  # the app, set by gunicorn's load_wsgi (wrapped: see load_wsgi)
    wsgi_app: Callable[..., Any]  # the app itself

    def init_process(self) -> None:
        # One entry per request handed to the thread pool that has not yet been
        # through the app (deque appends and pops are thread-safe).  The app
        # reads it to know whether another admission's audit record is coming
        # soon (post_worker_init).  Left when the app returns, before the answer
        # is sent: a client that sends its next request after reading the
        # answer never finds the previous one still counted.
        self.backlog: collections.deque[None] = collections.deque()
        self._in_backlog = threading.local()  # this thread's request is counted
        self._reading: dict[Any, _Reading] = {}
        self._stop_at: float | None = None
        self._evicted = 0  # idle connections closed at the limit, not yet reported
        self._evict_report_at = 0.0
        super().init_process()

    # -- entry point: every connection that needs a request goes through here

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.wsgi
        self.wsgi_app = app

        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            try:
                return app(environ, start_response)
            finally:
                self._leave_backlog()

        self.wsgi = counted

    def _leave_backlog(self) -> None:
        if getattr(self._in_backlog, "on", False):
            self._in_backlog.on = False
            self.backlog.pop()

    def enqueue_req(self, conn: Any) -> None:
        """Called by gthread for a new, a kept-alive readable or a pipelined connection."""
        if getattr(conn, "request_ready", False):
            conn.request_ready = False
            self.backlog.append(None)  # left when the app returns (or handle() ends)
            try:
                super().enqueue_req(conn)
            except BaseException:  # never handed to a thread: handle() will not pop it
                self.backlog.pop()
                raise
            return
        now = time.monotonic()
        state = _Reading(RequestScanner(self.max_body), now + self.cfg.keepalive, now)
        if not conn.initialized:
            state.deadline = now + HANDSHAKE_TIMEOUT
        else:
            # Bytes a previous request's parser read ahead (a pipelined request).
            state.buf += conn.parser.unreader.take_buffered()
            if state.buf:
                state.deadline = now + self.read_timeout
        self._reading[conn] = state
        if state.buf and self._framed(conn, state):
            return
        self._step(conn)

    def _on_event(self, conn: Any, fileobj: Any) -> None:
        self.poller.unregister(fileobj)
        self._step(conn)

    def _step(self, conn: Any) -> None:
        """Make what progress the socket allows, then wait in the poller or dispatch."""
        state = self._reading.get(conn)
        if state is None:
            return  # dropped (deadline) while a deferred step was queued
        try:
            if not conn.initialized and not self._handshake(conn, state):
                return
            if state.out and not self._flush(conn, state):
                return
            got = 0
            while got < _STEP_BYTES:
                try:
                    data = conn.sock.recv(64 * 1024)
                except (ssl.SSLWantReadError, BlockingIOError):
                    self._wait(conn, selectors.EVENT_READ)
                    return
                except ssl.SSLWantWriteError:
                    self._wait(conn, selectors.EVENT_WRITE)
                    return
                if not data:  # the client closed the connection
                    self._drop(conn, "closed by the client")
                    return
                got += len(data)
                if state.refused:
                    continue  # answered already: drop the rest of the body
                if not state.buf:  # the first byte of a request starts its clock
                    state.deadline = time.monotonic() + self.read_timeout
                state.buf += data
                if self._framed(conn, state):
                    return
            # A fast large body: continue on the next turn (TLS may hold
            # decrypted bytes the poller would not see, so no wait here).
            self.method_queue.defer(self._step, conn)
        except Exception as exc:  # a client must never take the worker down
            # ssl.SSLError and resets are OSErrors; anything else (a certificate
            # the hook cannot give) is as much a reason to drop this connection.
            self._drop(conn, f"{type(exc).__name__}: {exc}")

    def _handshake(self, conn: Any, state: _Reading) -> bool:
        """Advance the TLS handshake; True once the connection carries HTTP."""
        if self.cfg.is_ssl:
            if not isinstance(conn.sock, ssl.SSLSocket):
                conn.sock = gsock.ssl_context(self.cfg).wrap_socket(
                    conn.sock, server_side=True, do_handshake_on_connect=False,
                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)  # fmt: skip
            try:
                conn.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._wait(conn, selectors.EVENT_READ)
                return False
            except ssl.SSLWantWriteError:
                self._wait(conn, selectors.EVENT_WRITE)
                return False
        conn.initialized = True
        conn.parser = ghttp.get_parser(self.cfg, conn.sock, conn.client)
        state.deadline = time.monotonic() + self.cfg.keepalive  # idle until a byte comes
        return True

    def _framed(self, conn: Any, state: _Reading) -> bool:
        """Scan the buffer; dispatch or refuse the request once that is decided."""
        verdict = state.scanner.scan(state.buf)
        if verdict is Frame.NEED_MORE:
            return False
        if verdict is Frame.TOO_LARGE:
            self._refuse(conn, state)
        else:
            self._dispatch(conn, state)
        return True

    def _refuse(self, conn: Any, state: _Reading) -> None:
        """Answer 413 from the poller, then linger, dropping what still arrives."""
        message = state.scanner.refusal
        state.refused = True
        state.buf = bytearray()
        state.out = too_large_answer(message)
        state.deadline = max(state.deadline, time.monotonic() + _LINGER_SECONDS)
        refused = getattr(self.wsgi_app, "extensions", {}).get("ecr_webhook", {}).get("refused")
        if refused is not None:
            try:
                refused(413, message)
            except Exception:  # counting never takes the worker down
                self.log.exception("counting a refused request failed")
        self.method_queue.defer(self._step, conn)

    def _flush(self, conn: Any, state: _Reading) -> bool:
        """Send what ``state.out`` holds; False while waiting for the socket."""
        while state.out:
            try:
                sent = conn.sock.send(state.out)
            except (ssl.SSLWantWriteError, BlockingIOError):
                self._wait(conn, selectors.EVENT_WRITE)
                return False
            except ssl.SSLWantReadError:
                self._wait(conn, selectors.EVENT_READ)
                return False
            state.out = state.out[sent:]
        return True

    def _wait(self, conn: Any, events: int) -> None:
        self.poller.register(conn.sock, events, partial(self._on_event, conn))

    def _dispatch(self, conn: Any, state: _Reading) -> None:
        del self._reading[conn]
        conn.parser.unreader.unread(bytes(state.buf))
        conn.data_ready = True
        conn.request_ready = True
        self.enqueue_req(conn)

    def _drop(self, conn: Any, why: str) -> None:
        if self._reading.pop(conn, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.log.debug("connection from %s dropped: %s", conn.client, why)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections past their handshake, idle or request deadline."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and self._stop_at is None:
            # Stopping: idle connections linger briefly, as gthread's kept-alive ones do.
            self._stop_at = now + getattr(gthread, "STOP_KEEPALIVE_LINGER", 2.0)
        for conn, state in list(self._reading.items()):
            deadline = state.deadline
            if self._stop_at is not None and not state.buf:
                deadline = min(deadline, self._stop_at)
            if now >= deadline:
                self._drop(conn, "after 413" if state.refused
                           else "deadline passed" if state.buf else "idle")  # fmt: skip
        if self.nr_conns >= self.worker_connections and self.alive:
            self._evict_idle(now)

    def _evict_idle(self, now: float) -> None:
        """At ``worker_connections``, close the connections idle longest, to accept again.

        Without this, connections that only idle (kept alive, or opened and
        never sent a byte) fill the worker's connection slots for up to the
        keep-alive timeout, and the apiserver's next connection waits in the
        listen backlog until its own timeout.  nginx does the same when it runs
        out of connections (ngx_drain_connections closes up to 32 idle
        keep-alive connections).  Only connections with no request bytes are
        closed: a client sending a request keeps it.  The longest idle go
        first, so a client that keeps using its connections keeps them.
        """
        idle = heapq.nsmallest(
            _EVICT_BATCH,
            ((state.since, id(conn), conn) for conn, state in self._reading.items()
             if not state.buf and not state.out and not state.refused),
        )  # fmt: skip
        for _, _, conn in idle:
            self._drop(conn, "idle, closed at the connection limit")
        self._evicted += len(idle)
        if self._evicted and now >= self._evict_report_at:
            self.log.warning(
                "connection limit (%d) reached: closed %d idle connections "
                "(reported at most every %d s)",
                self.worker_connections, self._evicted, _EVICT_REPORT_SECONDS,
            )  # fmt: skip
            self._evicted = 0
            self._evict_report_at = now + _EVICT_REPORT_SECONDS

    # -- in a thread: a whole request is buffered

    def handle(self, conn: Any) -> Any:
        """Serve the buffered request; every socket read and write bounded by read_timeout."""
        req = None
        self._in_backlog.on = True  # appended when the request was handed over
        try:
            conn.sock.settimeout(self.read_timeout)
            req = next(conn.parser)
            if not req:
                return False
            return self._keepalive_after(conn, self.handle_request(req, conn))
        except TimeoutError:
            self.log.debug("connection from %s: read or write timed out", conn.client)
        except (ghttp.errors.NoMoreData, StopIteration) as exc:
            self.log.debug("closing connection: %s", exc)
        except ssl.SSLError as exc:
            if exc.args[0] != ssl.SSL_ERROR_EOF:
                self.handle_error(req, conn.sock, conn.client, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, conn.sock, conn.client, exc)
        finally:
            self._leave_backlog()  # a request that never reached the app
        return False


def make_worker(read_timeout: float, max_body: int) -> type[WebhookWorker]:
    """The worker class ``serve`` runs, with its read deadline and body limit."""
    return type("WebhookWorker", (WebhookWorker,),
                {"read_timeout": read_timeout, "max_body": max_body})  # fmt: skip


class GunicornLogger(GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's error log in the klog JSON format; no access log."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        logs.attach(self.error_log, 4 if cfg.loglevel == "debug" else 0)


# --------------------------------------------------------------------------- metrics port


def listen(host: str, port: int, flag: str, backlog: int = 64) -> socket.socket:
    """A listening TCP socket; ConfigError naming ``flag`` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port}: {why}") from None


def check_port_free(host: str, port: int, flag: str) -> None:
    listen(host, port, flag).close()


def serve_metrics(sock: socket.socket, exposition: Callable[[], tuple[bytes, str]]) -> None:
    """Serve ``GET /metrics`` on the inherited listening ``sock`` from a daemon thread.

    The socket is non-blocking and shared by all workers: each worker's thread
    waits for it to be readable and the one whose ``accept`` wins answers.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = 10
        server_version = "ecr-webhook-metrics"

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served on this port")
                return
            body, content_type = exposition()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


# --------------------------------------------------------------------------- dev mode


def webhook_configuration(url: str, ca_pem: bytes) -> dict[str, Any]:
    """A MutatingWebhookConfiguration that calls ``url`` (dev mode, a local cluster)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "ecr-webhook"},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1", "v1beta1"],
            "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_pem).decode()},
            "rules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                 "resources": ["pods"], "scope": "Namespaced"},
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
                 "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"},
            ],
            # The webhook never denies; if it cannot answer, pods are admitted.
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "matchPolicy": "Equivalent",
            # The planner is idempotent, so a second call after other webhooks
            # changed the pod is safe (Kubernetes docs, "Reinvocation policy").
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["ecr-webhook"]}]},
            "objectSelector": {"matchExpressions": [{
                "key": "ecr-webhook.io/skip", "operator": "NotIn", "values": ["true"]}]},
        }],
    }  # fmt: skip


def prepare_dev(config: ServeConfig, cert_dir: str = DEV_CERT_DIR) -> ServeConfig:
    """``--dev``: a loopback certificate in ``cert_dir``, 127.0.0.1, a printed webhook config.

    The certificate is generated only when ``cert_dir/tls.crt`` is absent, so a
    local cluster keeps trusting the same CA across restarts.  The
    configuration goes to stderr (stdout carries audit records) and to
    ``cert_dir/mutatingwebhookconfiguration.yaml`` for ``kubectl apply -f``.
    """
    out = Path(cert_dir)
    cert, key, ca = out / certs.CERT_FILE, out / certs.KEY_FILE, out / certs.CA_FILE
    if not cert.exists():
        bundle = certs.build_certificate(["localhost"], ["127.0.0.1"])
        certs.write_bundle(bundle, out)
        logs.stderr_line(f"ecr-webhook: wrote a loopback certificate to {out}/")
    if not ca.exists():
        raise ConfigError(f"--dev: {ca} is missing; remove {out}/ to generate a new set")
    config = replace(config, host="127.0.0.1", cert_file=str(cert), key_file=str(key))
    url = f"https://127.0.0.1:{config.port}/mutate"
    doc = webhook_configuration(url, ca.read_bytes())
    text = yaml.safe_dump(doc, sort_keys=False)
    path = out / "mutatingwebhookconfiguration.yaml"
    path.write_text(text)
    ca_bundle = doc["webhooks"][0]["clientConfig"]["caBundle"]
    logs.stderr_line(f"caBundle: {ca_bundle}")
    logs.stderr_line(f"# kubectl apply -f {path}\n---\n{text}")
    return config


# --------------------------------------------------------------------------- gunicorn


class WebhookApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn embedded: options from a dict, the WSGI app from a loader."""

    def __init__(self, options: Mapping[str, Any], loader: Callable[[], WSGIApp]) -> None:
        self.options = dict(options)
        self.loader = loader
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorns lack some settings
                self.cfg.set(key, value)

    def load(self) -> WSGIApp:
        return self.loader()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gunicorn_options(config: ServeConfig, runtime_dir: str) -> dict[str, Any]:
    """The gunicorn settings ``serve`` uses (bench/load.py serves its floor with them)."""
    return {
        "bind": [_bind(config.host, config.port)],
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": make_worker(config.read_timeout, MAX_BODY),
        "keepalive": KEEPALIVE_SECONDS,
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "certfile": config.cert_file,
        "keyfile": config.key_file,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "debug" if config.log_verbosity >= logs.STACKTRACE_VERBOSITY else "info",
        "logger_class": GunicornLogger,
        "worker_tmp_dir": runtime_dir,
        "proc_name": "ecr-webhook",
        "control_socket_disable": True,
    }


def _prepare_runtime_dir() -> tuple[str, bool]:
    """The directory for metrics files and locks: (path, created here)."""
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        os.makedirs(existing, exist_ok=True)
        # prometheus_client requires the directory to be wiped between runs.
        for f in glob.glob(os.path.join(existing, "*.db")):
            os.remove(f)
        return existing, False
    path = tempfile.mkdtemp(prefix="ecr-webhook-")
    os.environ[MULTIPROC_ENV] = path
    return path, True


def _use_multiprocess_values() -> None:
    """Make prometheus_client store values in files, even if imported before the env var."""
    from prometheus_client import values  # only after the env var is set

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def check_key_mode(key_file: str) -> None:
    """Refuse a private key that every local user may read or write.

    ``certs generate`` writes 0600; the Deployment mounts the Secret with
    ``defaultMode: 0440`` (owner and the pod's fsGroup), which passes.  A key
    readable by "other" is as good as published on that machine.  Checked at
    start only: a rotated Secret keeps the volume's mode.
    """
    mode = stat.S_IMODE(os.stat(key_file).st_mode)
    if mode & 0o007:
        raise ConfigError(
            f"--key-file {key_file}: mode {mode:04o} lets every user read or write the "
            f"private key; chmod 600 it (or 0440 with a group, as the Secret volume does)"
        )


def validate(config: ServeConfig) -> str | None:
    """Everything that can be checked before forking; raises EcrWebhookError.

    Returns the cluster region the policy, ``--region`` and the environment give.
    """
    if config.workers < 1 or config.threads < 1:
        raise ConfigError(
            f"--workers {config.workers} --threads {config.threads}: both must be >= 1"
        )
    load_certificate(config.cert_file, config.key_file, config.client_ca)
    check_key_mode(config.key_file)
    region = build_context(config.policy_file, config.region, os.environ,
                           fallback_regions=config.fallback_regions).cluster.region  # fmt: skip
    if config.probe or config.registry_endpoints or config.registry_ca or config.probe_timeout:
        from webhook.prober import ProbeOptions

        ProbeOptions(config.probe, config.fallback_regions, config.registry_endpoints,
                     config.registry_ca, config.probe_timeout).check()  # fmt: skip
    if config.audit_log != "-":
        try:
            fd = os.open(config.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise ConfigError(
                f"--audit-log {config.audit_log}: cannot open it: {exc.strerror}"
            ) from None
        os.close(fd)
    if config.port == config.metrics_port:
        raise ConfigError(f"--metrics-port {config.metrics_port}: must differ from --port")
    check_port_free(config.host, config.port, "--port")
    return region


def run(
    config: ServeConfig,
    *,
    app_factory: AppFactory | None = None,
    gunicorn_overrides: Mapping[str, Any] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; the exit status.  Raises EcrWebhookError before serving.

    ``app_factory`` and ``gunicorn_overrides`` exist for bench/load.py, which
    serves a canned "floor" app with exactly these settings, and shows the
    stock gthread worker stalling for comparison.
    """
    if config.dev:
        config = prepare_dev(config)
    log = logs.configure(config.log_verbosity)
    region = validate(config)
    if region is None:
        # Without the cluster's region a commercial image in a China or GovCloud
        # cluster cannot be told apart, and preferClusterRegion does nothing;
        # only wrong accounts are fixed, within each image's own region.
        log.error("no cluster region: set --region, the policy's region or AWS_REGION; "
                    "partition checks are off")  # fmt: skip
    elif unknown_region(region):
        # A region launched after this release (issue 11): serve anyway.  Counted
        # by each worker in ecr_webhook_cluster_region_unknown.
        log.error(UNKNOWN_REGION_MESSAGE, err=f"unknown region {region}", region=region,
                  dataVersion=DATA_VERSION)  # fmt: skip
    metrics_sock = listen(config.host, config.metrics_port, "--metrics-port")
    metrics_sock.setblocking(False)

    master = os.getpid()
    runtime_dir, owned = _prepare_runtime_dir()
    try:
        _use_multiprocess_values()
        from webhook import metrics  # prometheus_client: after the env var

        certificate = CertificateHolder(config.cert_file, config.key_file,
                                        client_ca=config.client_ca)  # fmt: skip

        def load() -> WSGIApp:
            if app_factory is not None:
                return app_factory(config)
            from webhook.app import create_app  # imports prometheus_client

            lock = os.path.join(runtime_dir, "audit.lock") if config.audit_log == "-" else None
            audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes,
                             backups=config.audit_backups, lock_file=lock)  # fmt: skip
            # Per-request metrics flushed every second (webhook.metrics.Metrics).
            local = metrics.Metrics(flush_seconds=metrics.FLUSH_SECONDS)
            return create_app(config, audit=audit, certificate=certificate, metrics=local,
                              log=logs.Log(verbosity=config.log_verbosity))  # fmt: skip

        def ssl_context(conf: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return certificate.context()

        def post_worker_init(worker: Any) -> None:
            # The app's Metrics writes what it gathered before it answers a
            # scrape (Metrics.exposition); bench/load.py's floor app has none.
            app = getattr(worker, "wsgi_app", worker.wsgi)  # WebhookWorker wraps the app
            hooks = getattr(app, "extensions", {}).get("ecr_webhook", {})
            local = hooks.get("metrics")
            if "backlog" in hooks and hasattr(worker, "backlog"):
                hooks["backlog"](worker.backlog)
            exposition = (local.exposition if local is not None
                          else lambda: metrics.multiprocess_exposition(runtime_dir))  # fmt: skip
            serve_metrics(metrics_sock, exposition)

        def child_exit(server: Any, worker: Any) -> None:
            metrics.mark_process_dead(worker.pid, runtime_dir)

        options = gunicorn_options(config, runtime_dir)
        options.update(ssl_context=ssl_context, post_worker_init=post_worker_init,
                       child_exit=child_exit)  # fmt: skip
        options.update(gunicorn_overrides or {})
        log.info("serving", address=f"https://{_bind(config.host, config.port)}/mutate",
                 metrics=f"http://{_bind(config.host, config.metrics_port)}/metrics",
                 workers=config.workers, threads=config.threads,
                 policy=config.policy_file or "<defaults>", audit=config.audit_log)  # fmt: skip
        try:
            WebhookApplication(options, load).run()
        except SystemExit as exc:
            if os.getpid() != master:
                raise  # a worker leaving: never run the master's cleanup below
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0
    finally:
        if os.getpid() == master:
            metrics_sock.close()
            if owned:
                shutil.rmtree(runtime_dir, ignore_errors=True)
                os.environ.pop(MULTIPROC_ENV, None)
