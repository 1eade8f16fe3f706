"""Registry availability probes: the I/O half of issue 8.  A shell module.

``Prober.probe_all(refs, budget)`` asks the registries of ``refs``, all at
once, whether they serve them, and answers within ``budget`` seconds whatever
the registries do; ``webhook.core.probing`` judges the answers and the
planner decides from them.  ``ProbingAdmit`` wraps ``review.admit`` with it for
the server, ``probe_documents`` does the same for ``dry-run``.

How one reference is probed:

* **Amazon ECR** (a ``*.dkr.ecr.*`` host): an authorization token from
  ``ecr.get_authorization_token`` in the registry's region, then
  ``HEAD /v2/<repository>/manifests/<tag or digest>`` with
  ``Authorization: Basic <token>`` (the token is already base64 of
  ``AWS:<password>``; ECR user guide, "Private registry authentication").
  Credentials come from boto3's default chain and the endpoint from boto3's
  settings (``AWS_ENDPOINT_URL_ECR``).  One client per region, created once
  (boto3 clients are thread-safe, sessions are not: boto3 docs, "Multithreading
  or multiprocessing with resources").  Tokens are cached per region and
  refreshed at three quarters of their life (a token lives 12 h); an
  ``expiresAt`` already in the past (a skewed clock, a stub such as moto) is
  used and asked again after ``PAST_EXPIRY_RETRY`` seconds, not on every probe.
  A cached token that the registry refuses is replaced and the probe retried
  once.
* **Any other registry** (a mirror such as Harbor): the same HEAD without
  credentials; a ``401`` with a ``WWW-Authenticate: Bearer realm=...`` challenge
  is followed anonymously (GET the realm with ``service`` and ``scope``, then the
  HEAD with the bearer token), as the Docker Registry v2 token flow describes
  (distribution docs, "Token Authentication Specification").

The ``Accept`` header names the OCI image index and manifest and the Docker
manifest list and v2 manifest: a registry answers 404 to a HEAD whose Accept
excludes the stored media type (distribution registry/handlers/manifests.go).

Budget, concurrency, cache:

* every probe of one admission runs concurrently on a bounded thread pool;
  the admission waits at most ``budget`` seconds, and a registry that has not
  answered the HEAD at ``PROBE_SHARE`` of the budget is ``unreachable`` (timed
  out), so a hung registry is classified inside the admission that first
  asked; the limit is a hard one for each whole exchange, however slowly the
  bytes come (``_Watchdog``), so no registry holds a pool thread past it (the
  token call has its own limit, ``TOKEN_TIMEOUT``, per read and one attempt,
  for the STS call of IRSA credentials too: a slow ECR API is not a slow
  registry);
* single-flight per (registry, repository, reference): concurrent admissions
  of the same cold image share one probe, within a worker by a shared future
  and across the server's workers by a lock file with the answer beside it;
* an LRU cache bounded in size: positive answers for 5 min, negative for 30 s
  by default; an entry used in the last part of its life (``REFRESH_AHEAD``)
  is refreshed in the background, so in the steady state no admission waits
  on a registry;
* nothing here raises into an admission: a probe that breaks is an
  ``unreachable`` or ``server-error`` answer, and ``ProbingAdmit`` plans
  without evidence if the prober itself fails.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures as cf
import contextlib
import datetime as dt
import fcntl
import hashlib
import heapq
import itertools
import json
import os
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any, Protocol
from urllib.parse import urlencode, urlsplit

import urllib3
import urllib3.connection
import urllib3.connectionpool

from webhook.core import ecr, review
from webhook.core.errors import ConfigError
from webhook.core.imageref import ImageRef
from webhook.core.plan import PlanContext
from webhook.core.policy import (
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_POSITIVE_TTL,
    DEFAULT_PROBE_BUDGET,
    MAX_PROBE_BUDGET,
    Policy,
    check_region,
)
from webhook.core.probing import NEGATIVE, Outcome, Probe, classify_status

# The media types a pull accepts (OCI image-spec media-types.md; Docker image
# manifest v2 schema 2 spec).  ECR stores all four.
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))  # fmt: skip
PROBE_SHARE = 0.8  # a probe's own time limit, as a share of the admission budget
ANSWER_MARGIN = 0.03  # seconds of the budget kept for the rest of the admission
REFRESH_AHEAD = 0.25  # refresh a used entry in the last quarter of its life
PAST_EXPIRY_RETRY = 60.0  # seconds: ask again for a token whose expiresAt had passed
TOKEN_LIFE_SHARE = 0.75  # refresh an ECR token at three quarters of its life
# GetAuthorizationToken's own time limit (connect and read): tokens are asked for
# rarely, mostly ahead of need, and a slow ECR API says nothing about a registry.
TOKEN_TIMEOUT = 5.0
TOKEN_FAILURE_BACKOFF = 10.0  # seconds before a failed token call is tried again
RETRY_TOKEN_AGE = 300.0  # seconds: a refused token this old is replaced and the probe retried
DEFAULT_CACHE_SIZE = 4096
DEFAULT_CONCURRENCY = 16
USER_AGENT = "ecr-webhook-prober"
EXAMPLE_HOST = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
# How often the watchdog looks again at an exchange that is past its deadline
# but has no socket to shut yet (it is still connecting, itself time-limited).
RECHECK = 0.02
_MARKERS = ("Connection refused", "Name or service not known", "certificate verify failed",
            "No route to host", "timed out", "Temporary failure in name resolution")  # fmt: skip
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class ProbeObserver(Protocol):
    """What the prober reports (``webhook.metrics.Metrics`` implements it)."""

    def probed(self, registry: str, outcome: str, seconds: float) -> None: ...
    def cache_lookup(self, hit: bool) -> None: ...
    def token_refresh(self, ok: bool) -> None: ...
    def out_of_budget(self) -> None: ...


class _NoObserver:
    def probed(self, registry: str, outcome: str, seconds: float) -> None:
        return None

    def cache_lookup(self, hit: bool) -> None:
        return None

    def token_refresh(self, ok: bool) -> None:
        return None

    def out_of_budget(self) -> None:
        return None


@dataclass(frozen=True)
class ProberSettings:
    """How the prober behaves; immutable, built from flags and the policy."""

    budget: float = DEFAULT_PROBE_BUDGET
    positive_ttl: float = DEFAULT_POSITIVE_TTL
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    cache_size: int = DEFAULT_CACHE_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    endpoints: Mapping[str, str] = field(default_factory=dict)
    ca_file: str | None = None


def parse_endpoints(values: Iterable[str], flag: str = "--registry-endpoint") -> dict[str, str]:
    """``HOST=URL`` pairs (``URL`` is ``https://host[:port]``, no path).  Raises ConfigError."""
    out: dict[str, str] = {}
    for value in values:
        host, sep, url = value.partition("=")
        parts = urlsplit(url)
        if not sep or not host or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{flag} {value!r}: expected HOST=URL, e.g. "
                              f"{EXAMPLE_HOST}=https://127.0.0.1:5000")  # fmt: skip
        if parts.path.strip("/") or parts.query:
            raise ConfigError(f"{flag} {value!r}: the URL takes no path (scheme, host, port)")
        out[host.lower()] = f"{parts.scheme}://{parts.netloc}"
    return out


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's CA certificates, plus ``ca_file`` (``--registry-ca``)."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"--registry-ca {ca_file}: cannot load it: {why}") from None
    return ctx


class _Failed(Exception):
    """A probe step that failed with a known outcome."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


# --------------------------------------------------------------------------- hard deadlines

# The exchange (below) the current thread is in, if any: urllib3 calls the
# connection's methods on the thread that made the request.
_CURRENT = threading.local()


class _Exchange:
    """One HTTP exchange (a request and its whole answer) with a hard deadline."""

    __slots__ = ("clock", "conn", "deadline", "done", "fired", "lock")

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock
        self.conn: urllib3.connection.HTTPConnection | None = None
        self.done = False
        self.fired = False  # the deadline passed while it ran
        self.lock = threading.Lock()

    def expire(self) -> bool:
        """Shut down the socket of a running exchange; False if it has none yet.

        ``shutdown(2)``, not ``close``: the socket stays the reading thread's to
        close, and a ``recv`` blocked on it returns end-of-file at once (the
        base ``socket.shutdown``, so an ``SSLSocket`` keeps its state for that
        thread).  A socket not yet connected (``fileno() == -1``: wrapped into
        TLS, or none) is left to its connect timeout, and looked at again.
        """
        with self.lock:
            if self.done:
                return True
            self.fired = True
            sock = getattr(self.conn, "sock", None)
            if sock is None or sock.fileno() == -1:
                return False
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            return True


class _Watchdog:
    """Hard total deadlines for the prober's HTTP exchanges.

    urllib3's timeouts are per socket operation (the connect; each read), so a
    registry that sends a byte every few tenths of a second never trips them
    and holds a probe thread for as long as it trickles.  ``bound(deadline)``
    runs one exchange under a deadline: one daemon thread (started on first
    use, ended by ``close``) keeps the exchanges by deadline and shuts down the
    socket of one still running at its deadline, so the read fails and the
    prober reports the timeout it already reports for a hung registry.

    The connect is bounded too: the connection classes below give the new
    socket the time left as its timeout, and CPython's TLS handshake holds to
    the socket timeout as a deadline for the whole handshake (``_ssl.c``,
    ``do_handshake``), so a trickled handshake ends there as well.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, _Exchange]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def bound(self, deadline: float) -> Iterator[_Exchange]:
        exchange = _Exchange(deadline, self._clock)
        self._arm(exchange, deadline)
        _CURRENT.exchange = exchange
        try:
            yield exchange
        finally:
            _CURRENT.exchange = None
            with exchange.lock:
                exchange.done = True
                exchange.conn = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._due.clear()
            self._cond.notify()

    def _arm(self, exchange: _Exchange, at: float) -> None:
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._due, (at, next(self._order), exchange))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="probe-deadlines",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            elif self._due[0][2] is exchange:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    wait = self._due[0][0] - self._clock() if self._due else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, _, exchange = heapq.heappop(self._due)
            if not exchange.expire():
                self._arm(exchange, self._clock() + RECHECK)


def _time_left() -> float | None:
    exchange: _Exchange | None = getattr(_CURRENT, "exchange", None)
    if exchange is None:
        return None
    return max(exchange.deadline - exchange.clock(), 0.001)


def _watched(conn: urllib3.connection.HTTPConnection) -> None:
    exchange: _Exchange | None = getattr(_CURRENT, "exchange", None)
    if exchange is not None:
        with exchange.lock:
            exchange.conn = conn


class _Connection(urllib3.connection.HTTPConnection):
    """urllib3's connection, under the current thread's exchange deadline (if any)."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        left = _time_left()
        if left is not None:  # the TLS handshake that follows: only the time left
            sock.settimeout(left)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self)
        super().request(*args, **kwargs)


class _TLSConnection(_Connection, urllib3.connection.HTTPSConnection):
    """``_Connection`` for HTTPS: its two methods, then HTTPSConnection's (MRO)."""


class _Pool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


@dataclass
class _Entry:
    probe: Probe
    expires: float
    refresh_at: float


@dataclass
class _Token:
    value: str
    refresh_at: float
    fetched_at: float = 0.0
    expires: float | None = None


def _epoch(expires: object) -> float | None:
    """``expiresAt`` (a datetime from boto3, or epoch seconds) as epoch seconds."""
    if isinstance(expires, dt.datetime):
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        return expires.timestamp()
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return float(expires)
    return None


def _ecr_failure(exc: BaseException) -> str:
    """What a failed GetAuthorizationToken said (botocore error shapes): code or class."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return code or f"HTTP {status}"
    return type(exc).__name__


class Prober:
    """Probes registries with a budget, a bounded cache and single flights.

    Thread-safe.  Create one per process (after a fork: threads and boto3
    clients do not survive one).  ``shared_dir``: a directory private to one
    server and shared by its workers, for one probe per key across them
    (``_probe_shared``).  ``ecr_client`` builds the boto3 ECR client of
    a region (tests inject one); ``clock`` is monotonic seconds, ``wall`` epoch
    seconds (token expiry is a wall-clock time).
    """

    def __init__(
        self,
        settings: ProberSettings | None = None,
        *,
        observer: ProbeObserver | None = None,
        ecr_client: Callable[[str, float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        shared_dir: str | None = None,
    ) -> None:
        self.settings = settings or ProberSettings()
        self.shared_dir = shared_dir
        if shared_dir is not None:
            os.makedirs(shared_dir, mode=0o700, exist_ok=True)
        self.observer: ProbeObserver = observer or _NoObserver()
        self._make_client = ecr_client or _boto3_client
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, cf.Future[Probe]] = {}
        self._clients: dict[str, Any] = {}
        self._client_lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._token_failures: dict[str, tuple[float, str]] = {}
        self._token_locks: dict[str, threading.Lock] = {}
        self._bearer: dict[tuple[str, str, str], _Token] = {}
        self._pool = cf.ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="probe")
        self._http = urllib3.PoolManager(
            num_pools=64, maxsize=4, ssl_context=tls_context(self.settings.ca_file),
            retries=False, headers={"User-Agent": USER_AGENT},
        )  # fmt: skip
        # Connections that the watchdog can end at an exchange's deadline.
        self._http.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        self._watchdog = _Watchdog(clock)
        self.label_hosts: frozenset[str] = frozenset()
        self.facts = ecr.default_facts()

    # ------------------------------------------------------------- public

    def probe_all(
        self,
        refs: Sequence[ImageRef],
        budget: float | None = None,
        positive_ttl: float | None = None,
        negative_ttl: float | None = None,
    ) -> dict[str, Probe]:
        """Evidence for each of ``refs`` (by ``str(ref)``), within ``budget`` seconds.

        A probe not finished in time answers ``no-answer`` (it keeps running and
        fills the cache for the next admission).  Never raises for a registry.
        """
        budget = self.settings.budget if budget is None else budget
        ttls = (positive_ttl or self.settings.positive_ttl,
                negative_ttl or self.settings.negative_ttl)  # fmt: skip
        # The admission's own work (planning, the answer, the audit record)
        # must fit in the budget too: the probes get all of it but a margin.
        deadline = self.clock() + max(budget / 2, budget - ANSWER_MARGIN)
        out: dict[str, Probe] = {}
        waiting: dict[str, cf.Future[Probe]] = {}
        for ref in refs:
            key = str(ref)
            if key in out or key in waiting:
                continue
            cached = self._lookup(key, ref, budget, ttls)
            if cached is not None:
                out[key] = cached
            else:
                waiting[key] = self._flight(key, ref, budget, ttls)
        if waiting:
            cf.wait(waiting.values(), timeout=max(0.0, deadline - self.clock()))
            late = False
            for key, fut in waiting.items():
                if fut.done() and fut.exception() is None:
                    out[key] = fut.result()
                else:
                    late = True
                    out[key] = Probe(key, Outcome.NO_ANSWER, budget * 1000, False,
                                     "no answer within the budget")  # fmt: skip
            if late:
                self.observer.out_of_budget()
        return out

    def prepare(self, refs: Iterable[ImageRef]) -> None:
        """Create the ECR clients and tokens ``refs`` need now, outside any budget.

        For the commands (dry-run, probe), which pay boto3's start-up once; a
        failure here is left for the probe itself to meet and classify.
        """
        regions = {h.region for h in map(ecr.parse_host, (r.host for r in refs)) if h}
        for region in regions:
            with contextlib.suppress(_Failed):
                self._token(region, self.clock() + TOKEN_TIMEOUT)

    def warm(self, regions: Iterable[str]) -> None:
        """Create the ECR clients of ``regions`` and get their tokens, in the background.

        At server start, so the first admissions do not wait on boto3's start-up
        or a token call; a failure is left for the probes to meet and classify.
        """
        for region in set(regions):
            self._pool.submit(self._warm, region)

    def _warm(self, region: str) -> None:
        with contextlib.suppress(Exception):
            self._client(region)
            self._token(region, self.clock() + TOKEN_TIMEOUT)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._watchdog.close()
        self._http.clear()

    # ------------------------------------------------------------- cache and flights

    def _lookup(self, key: str, ref: ImageRef, budget: float,
                ttls: tuple[float, float]) -> Probe | None:  # fmt: skip
        now = self.clock()
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry.expires <= now:
                if entry is not None:
                    del self._cache[key]
                hit = False
            else:
                self._cache.move_to_end(key)
                hit = True
                refresh = now >= entry.refresh_at and key not in self._flights
        self.observer.cache_lookup(hit)
        if not hit:
            return None
        assert entry is not None  # nosec B101  # hit implies an entry; mypy narrowing
        if refresh:
            # A hot entry near its end: refreshed in the background, answered now.
            self._flight(key, ref, budget, ttls)
        p = entry.probe
        return Probe(p.candidate, p.outcome, p.latency_ms, True, p.detail)

    def _flight(self, key: str, ref: ImageRef, budget: float,
                ttls: tuple[float, float]) -> cf.Future[Probe]:  # fmt: skip
        with self._lock:
            fut = self._flights.get(key)
            if fut is not None:
                return fut
            fut = cf.Future()
            self._flights[key] = fut
        try:
            self._pool.submit(self._run, key, ref, budget * PROBE_SHARE, ttls, fut)
        except RuntimeError as exc:  # pool shut down
            with self._lock:
                self._flights.pop(key, None)
            fut.set_exception(exc)
        return fut

    def _run(self, key: str, ref: ImageRef, limit: float, ttls: tuple[float, float],
             fut: cf.Future[Probe]) -> None:  # fmt: skip
        try:
            probe, age = self._probe_shared(key, ref, limit, ttls)
            if probe.outcome is Outcome.NO_ANSWER:  # no evidence: nothing to cache
                fut.set_result(probe)
                return
            now = self.clock()
            ttl = (ttls[1] if probe.outcome in NEGATIVE else ttls[0]) - age
            with self._lock:
                self._cache[key] = _Entry(probe, now + ttl, now + ttl * (1 - REFRESH_AHEAD))
                self._cache.move_to_end(key)
                while len(self._cache) > self.settings.cache_size:
                    self._cache.popitem(last=False)
            fut.set_result(probe)
        except BaseException as exc:  # a bug must not leave waiters hanging
            fut.set_exception(exc)
        finally:
            with self._lock:
                self._flights.pop(key, None)

    def _probe_shared(self, key: str, ref: ImageRef, limit: float,
                      ttls: tuple[float, float]) -> tuple[Probe, float]:  # fmt: skip
        """(probe, its age in seconds): one probe per key across the server's workers.

        Workers are processes; the single flight and the cache of each stop at
        its edge.  With ``shared_dir`` (the server's private runtime
        directory) a probe holds an exclusive ``flock`` on the key's lock file
        and leaves its answer next to it; a worker that wants the same key
        waits for the lock and takes an answer young enough (under three
        quarters of its TTL) instead of probing again.  Failing that (no
        directory, the lock not had in time, an unreadable file) it probes.
        """
        if self.shared_dir is None:
            return self.probe_now(ref, limit), 0.0
        h = ecr.parse_host(ref.host)
        if h is not None:  # boto3's start-up before the lock, not while others wait on it
            with contextlib.suppress(Exception):
                self._client(h.region)
        name = os.path.join(self.shared_dir, hashlib.sha256(key.encode()).hexdigest()[:40])
        # The holder started first and is done after its token call and ``limit``.
        give_up = time.monotonic() + TOKEN_TIMEOUT + limit * 1.5 + 0.1
        try:
            fd = os.open(name + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return self.probe_now(ref, limit), 0.0
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        return self.probe_now(ref, limit), 0.0
                    time.sleep(0.005)
            shared = _read_answer(name, key, self.wall(), ttls)
            if shared is not None:
                return shared
            probe = self.probe_now(ref, limit)
            if probe.outcome is not Outcome.NO_ANSWER:
                _write_answer(name, probe, self.wall())
            return probe, 0.0
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------- one probe

    def probe_now(self, ref: ImageRef, limit: float) -> Probe:
        """Probe ``ref`` now, uncached, giving up after ``limit`` seconds."""
        h = ecr.parse_host(ref.host)
        if h is not None:
            # boto3's client start-up (hundreds of ms, once per region and
            # process) is ours, not the registry's: the limit starts after it.
            with contextlib.suppress(Exception):
                self._client(h.region)
        started = time.perf_counter()
        try:
            if h is not None:
                # The token call is the ECR API's time, not the registry's: the
                # registry's limit starts when the token is there.  (The
                # admission that asked waits only its budget either way.)
                token, fresh = self._token(h.region, self.clock() + TOKEN_TIMEOUT)
                status = self._ask_ecr(ref, h.region, token, fresh, limit)
            else:
                status = self._ask(ref, self.clock() + limit)
            outcome, detail = classify_status(status), f"HTTP {status}"
        except _Failed as exc:
            outcome, detail = exc.outcome, exc.detail
        except Exception as exc:  # never into the admission
            outcome, detail = Outcome.SERVER_ERROR, f"probe failed: {type(exc).__name__}"
        seconds = time.perf_counter() - started
        self.observer.probed(self._label(ref.host or ""), str(outcome), seconds)
        return Probe(str(ref), outcome, seconds * 1000, False, detail)

    def _label(self, host: str) -> str:
        """A bounded metrics label: an official EKS registry or a known mirror, else other."""
        h = ecr.parse_host(host)
        if (h is not None and self.facts.is_official(h)) or host in self.label_hosts:
            return host
        return "other"

    def _url(self, ref: ImageRef) -> str:
        domain = (ref.domain or "").lower()
        eps = self.settings.endpoints
        base = eps.get(domain) or eps.get(ref.host or "") or f"https://{domain}"
        reference = ref.digest or ref.tag or "latest"
        return f"{base}/v2/{ref.path}/manifests/{reference}"

    def _head(self, url: str, headers: Mapping[str, str], deadline: float) -> Any:
        return self._exchange("HEAD", url, headers, deadline, "")

    def _exchange(self, method: str, url: str, headers: Mapping[str, str], deadline: float,
                  what: str) -> Any:  # fmt: skip
        """One request and its whole answer (read, the connection released), ended at
        ``deadline`` whatever the server does (``_Watchdog``); ``what`` prefixes a
        failure's detail.

        Every failure to get an answer is ``unreachable``; one at the deadline,
        per read or in total, is ``timed out``.
        """
        left = deadline - self.clock()
        if left <= 0:
            raise _Failed(Outcome.UNREACHABLE, f"{what}timed out")
        with self._watchdog.bound(deadline) as exchange:
            try:
                resp = self._http.request(
                    method, url, headers=dict(headers), redirect=False, retries=False,
                    timeout=urllib3.Timeout(connect=left, read=left), preload_content=False,
                )  # fmt: skip
                # The whole body, under the deadline.  The connection goes back
                # to the pool only after the exchange is over (below), so the
                # watchdog never shuts one down that another exchange has taken.
                resp.read(cache_content=True)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # urllib3 2 makes NewConnectionError (refused, no route) a ConnectTimeoutError.
                per_read = isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
                    exc, urllib3.exceptions.NewConnectionError)  # fmt: skip
                if exchange.fired or per_read:
                    raise _Failed(Outcome.UNREACHABLE, f"{what}timed out") from None
                if isinstance(exc, urllib3.exceptions.SSLError):
                    raise _Failed(Outcome.UNREACHABLE, f"{what}TLS: {_short(exc)}") from None
                raise _Failed(Outcome.UNREACHABLE, f"{what}{_short(exc)}") from None
        resp.release_conn()
        return resp

    def _ask_ecr(self, ref: ImageRef, region: str, token: str, fresh: bool,
                 limit: float) -> int:  # fmt: skip
        url = self._url(ref)
        deadline = self.clock() + limit
        resp = self._head(url, {"Accept": ACCEPT, "Authorization": f"Basic {token}"}, deadline)
        if resp.status in (401, 403) and not fresh and (
            self._token_expired_since_fetch(region) or self._token_age(region) > RETRY_TOKEN_AGE
        ):
            # The cached token has expired, or may have been revoked: once more,
            # with a new one (not for a young, unexpired token: a registry that
            # refuses it would cost a token call on every probe).
            token, _ = self._token(region, self.clock() + TOKEN_TIMEOUT, force=True)
            deadline = self.clock() + limit
            resp = self._head(url, {"Accept": ACCEPT, "Authorization": f"Basic {token}"},
                              deadline)  # fmt: skip
        return int(resp.status)

    def _ask(self, ref: ImageRef, deadline: float) -> int:
        url = self._url(ref)
        resp = self._head(url, {"Accept": ACCEPT}, deadline)
        if resp.status != 401:
            return int(resp.status)
        challenge = resp.headers.get("WWW-Authenticate", "")
        if not challenge.lower().startswith("bearer"):
            return 401  # Basic, or nothing: no credentials for a mirror
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        token = self._bearer_token(params, ref, deadline)
        resp = self._head(url, {"Accept": ACCEPT, "Authorization": f"Bearer {token}"}, deadline)
        return int(resp.status)

    def _bearer_token(self, params: Mapping[str, str], ref: ImageRef, deadline: float) -> str:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise _Failed(Outcome.UNAUTHORIZED, "bearer challenge without a realm")
        service = params.get("service", "")
        scope = params.get("scope") or f"repository:{ref.path}:pull"
        key = (realm, service, scope)
        now = self.clock()
        with self._lock:
            cached = self._bearer.get(key)
        if cached is not None and cached.refresh_at > now:
            return cached.value
        query = urlencode({k: v for k, v in (("service", service), ("scope", scope)) if v})
        resp = self._exchange("GET", f"{realm}?{query}" if query else realm, {}, deadline,
                              "token: ")  # fmt: skip
        if resp.status != 200:
            raise _Failed(classify_status(resp.status), f"token: HTTP {resp.status}")
        try:
            doc = resp.json()
            value = str(doc.get("token") or doc.get("access_token") or "")
            life = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError):
            raise _Failed(Outcome.SERVER_ERROR, "token: not JSON") from None
        if not value:
            raise _Failed(Outcome.UNAUTHORIZED, "token: none given")
        with self._lock:
            self._bearer[key] = _Token(value, now + life * TOKEN_LIFE_SHARE)
            if len(self._bearer) > self.settings.cache_size:
                self._bearer.pop(next(iter(self._bearer)))
        return value

    # ------------------------------------------------------------- ECR tokens

    def _client(self, region: str) -> Any:
        client = self._clients.get(region)
        if client is None:
            with self._client_lock:  # boto3 sessions are not thread-safe
                client = self._clients.get(region)
                if client is None:
                    client = self._clients[region] = self._make_client(region, TOKEN_TIMEOUT)
        return client

    def _token(self, region: str, deadline: float, force: bool = False) -> tuple[str, bool]:
        """(token, fetched now) for ``region``; one GetAuthorizationToken at a time per region.

        A failed token call is no answer from any registry (``no-answer``, so
        the static rules decide, issue 8), and is not repeated for
        ``TOKEN_FAILURE_BACKOFF`` seconds: a throttled API is not hammered.
        """
        token = self._tokens.get(region)
        if token is not None and not force and token.refresh_at > self.wall():
            return token.value, False
        failed = self._token_failures.get(region)
        if failed is not None and failed[0] > self.wall():
            raise _Failed(Outcome.NO_ANSWER, failed[1])
        with self._lock:
            lock = self._token_locks.setdefault(region, threading.Lock())
        left = deadline - self.clock()
        if left <= 0 or not lock.acquire(timeout=left):
            # Another thread's token call is still running: that says nothing
            # about the registry yet, so it is no answer (and never cached).
            raise _Failed(Outcome.NO_ANSWER, "waiting for the token")
        try:
            current = self._tokens.get(region)
            if current is not None and current is not token and current.refresh_at > self.wall():
                return current.value, True  # another thread just fetched it
            try:
                answer = self._client(region).get_authorization_token()
                data = answer["authorizationData"][0]
                value = str(data["authorizationToken"])
                base64.b64decode(value, validate=True)
            except Exception as exc:
                self.observer.token_refresh(False)
                malformed = isinstance(exc, KeyError | IndexError | TypeError | binascii.Error)
                why = "token: malformed answer" if malformed else f"token: {_ecr_failure(exc)}"
                self._token_failures[region] = (self.wall() + TOKEN_FAILURE_BACKOFF, why)
                raise _Failed(Outcome.NO_ANSWER, why) from None
            self.observer.token_refresh(True)
            self._token_failures.pop(region, None)
            now = self.wall()
            expires = _epoch(data.get("expiresAt"))
            self._tokens[region] = _Token(value, self._refresh_at(expires), now, expires)
            return value, True
        finally:
            lock.release()

    def _token_expired_since_fetch(self, region: str) -> bool:
        """Whether the cached token was valid when fetched and its expiresAt has passed."""
        token = self._tokens.get(region)
        if token is None or token.expires is None:
            return False
        return token.fetched_at < token.expires <= self.wall()

    def _token_age(self, region: str) -> float:
        token = self._tokens.get(region)
        return self.wall() - token.fetched_at if token is not None else 0.0

    def _refresh_at(self, expires: float | None) -> float:
        """When to ask for a new token, given its ``expiresAt`` (epoch seconds).

        At three quarters of its life, so always before ``expiresAt``; a token
        whose ``expiresAt`` had already passed when it came (a skewed clock; moto
        always says 2015) is used, and asked for again after
        ``PAST_EXPIRY_RETRY`` seconds rather than on every probe.
        """
        now = self.wall()
        if expires is None or expires <= now:
            return now + PAST_EXPIRY_RETRY
        return now + (expires - now) * TOKEN_LIFE_SHARE


def _read_answer(name: str, key: str, now: float,
                 ttls: tuple[float, float]) -> tuple[Probe, float] | None:  # fmt: skip
    """Another worker's answer for ``key``, if young enough; else None."""
    try:
        with open(name + ".json", encoding="utf-8") as f:
            doc = json.load(f)
        outcome = Outcome(doc["outcome"])
        if doc["candidate"] != key:
            return None
        age = now - float(doc["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ttl = ttls[1] if outcome in NEGATIVE else ttls[0]
    if not 0 <= age < ttl * (1 - REFRESH_AHEAD):
        return None
    latency = float(doc.get("latencyMs", 0.0))
    return Probe(key, outcome, latency, True, str(doc.get("detail", ""))), age


def _write_answer(name: str, probe: Probe, now: float) -> None:
    doc = {"candidate": probe.candidate, "outcome": str(probe.outcome),
           "latencyMs": probe.latency_ms, "detail": probe.detail, "at": now}  # fmt: skip
    tmp = f"{name}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, name + ".json")


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    for marker in _MARKERS:
        if marker in text:
            return marker
    return text[:120]


def _boto3_client(region: str, timeout: float) -> Any:
    """The ECR client of ``region``: default credential chain, boto3's endpoint settings.

    ``timeout`` (connect and read) and one attempt hold for every client the
    session makes, not only this one: they are the session's default client
    config, which botocore merges into the clients its credential providers
    create (``Session.create_client`` merges ``get_default_client_config()``
    with the config it is given; ``AssumeRoleWithWebIdentityProvider`` makes its
    STS client through it, ``credentials.create_credential_resolver`` and
    ``_get_client_creator``).  So with IRSA the ``AssumeRoleWithWebIdentity``
    call inside the first token call, and each credential refresh after it,
    has the same limits instead of botocore's 60 s and legacy retries.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout,
                    retries={"total_max_attempts": 1})  # fmt: skip
    core = botocore.session.get_session()
    core.set_default_client_config(config)
    return boto3.session.Session(botocore_session=core).client("ecr", region_name=region)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class ProbeOptions:
    """The probing flags shared by ``dry-run``, ``serve`` and ``probe``.

    ``fallback_regions`` (``--fallback-region``) replace the policy's
    ``fallbackRegions`` when given; ``timeout`` (``--probe-timeout``) is the
    budget of one admission, over the policy's ``probe.timeoutSeconds``.
    """

    enabled: bool = False
    fallback_regions: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    ca_file: str | None = None
    timeout: float | None = None

    def apply(self, policy: Policy) -> Policy:
        """The policy with ``--fallback-region`` applied.  Raises PolicyError on a bad region."""
        if not self.fallback_regions:
            return policy
        regions = tuple(
            check_region(r, "--fallback-region", "command line") for r in self.fallback_regions
        )
        return replace(policy, fallback_regions=regions)

    def settings(self, policy: Policy) -> ProberSettings:
        """Prober settings from the flags, then the policy's ``probe:``, then defaults.

        Raises ConfigError naming the flag of a bad value.
        """
        if self.timeout is not None and not 0 < self.timeout <= MAX_PROBE_BUDGET:
            raise ConfigError(
                f"--probe-timeout {self.timeout}: must be seconds in "
                f"(0, {MAX_PROBE_BUDGET:g}], well under timeoutSeconds (5)"
            )
        p = policy.probe
        return ProberSettings(
            budget=self.timeout or p.timeout or DEFAULT_PROBE_BUDGET,
            positive_ttl=p.positive_ttl or DEFAULT_POSITIVE_TTL,
            negative_ttl=p.negative_ttl or DEFAULT_NEGATIVE_TTL,
            endpoints=parse_endpoints(self.endpoints),
            ca_file=self.ca_file,
        )

    def check(self) -> None:
        """Fail early on bad endpoint, CA or timeout flags (before a server forks)."""
        self.settings(Policy())
        tls_context(self.ca_file)


def probe_documents(docs: Sequence[Any], ctx: PlanContext, options: ProbeOptions) -> PlanContext:
    """``ctx`` with evidence about every reference the documents' decisions may consult.

    For ``dry-run``: all documents' probes run at once, within one budget;
    ECR clients are created first, outside it (a command pays their start-up
    once; a server creates them when a worker starts).
    """
    from webhook.core.objects import pod_sites
    from webhook.core.plan import probe_requests as pod_requests

    refs: dict[str, ImageRef] = {}
    for doc in docs:
        data = getattr(doc, "data", None)
        if getattr(doc, "error", None) is not None or not isinstance(data, Mapping):
            continue
        if data.get("kind") == "AdmissionReview":
            try:
                found: Iterable[ImageRef] = review.probe_requests(data, ctx)
            except Exception:  # nosec B112  # dry-run reports the bad review itself
                continue
        else:
            found = [r for _, site in pod_sites(data) if site is not None
                     for r in pod_requests(site.meta, site.spec, site.namespace, ctx)]  # fmt: skip
        for r in found:
            refs.setdefault(str(r), r)
    if not refs:
        return ctx
    prober = Prober(options.settings(ctx.policy))
    try:
        prober.label_hosts = mirror_hosts(ctx.policy)
        prober.prepare(refs.values())
        evidence = prober.probe_all(list(refs.values()))
    finally:
        prober.close()
    return ctx.with_evidence(evidence)


# --------------------------------------------------------------------------- admission


def budget_for(ctx: PlanContext, flag: float | None, default: float) -> float:
    """The budget: ``--probe-timeout``, else the policy's ``probe.timeoutSeconds``, else default."""
    if flag is not None:
        return flag
    return ctx.policy.probe.timeout or default


def mirror_hosts(policy: Policy) -> frozenset[str]:
    """Hosts of the policy's mirrors: with the official EKS registries, the only
    registries a metrics label may name (labels stay bounded)."""
    return frozenset(m.registry.split(":")[0].lower() for m in policy.mirrors)


class ProbingAdmit:
    """``review.admit`` with probe evidence: the server's ``admit`` when probing is on.

    Probing is on when ``--probe`` was given or the policy says ``probe: true``
    (checked per admission, so a policy reload turns it on or off).  Anything
    the prober does wrong leaves the admission to the static rules.
    """

    def __init__(
        self,
        prober: Callable[[], Prober],
        *,
        enabled: bool,
        budget: float | None,
        default_budget: float = DEFAULT_PROBE_BUDGET,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._get_prober = prober
        self.enabled = enabled
        self.budget = budget
        self.default_budget = default_budget
        self.on_error = on_error
        self._labelled: Policy | None = None  # the policy label_hosts was built from

    def __call__(self, body: object, ctx: PlanContext) -> review.Outcome:
        probe = ctx.policy.probe
        if not (self.enabled or probe.enabled):
            return review.admit(body, ctx)
        refs = review.probe_requests(body, ctx)  # raises ReviewError like admit
        if refs:
            try:
                prober = self._get_prober()
                if ctx.policy is not self._labelled:  # once per policy, not per admission
                    prober.label_hosts = mirror_hosts(ctx.policy)
                    self._labelled = ctx.policy
                budget = budget_for(ctx, self.budget, self.default_budget)
                evidence = prober.probe_all(refs, budget, probe.positive_ttl, probe.negative_ttl)
                ctx = ctx.with_evidence(evidence)
            except Exception as exc:  # a probe failure never fails an admission
                if self.on_error is not None:
                    self.on_error(exc)
        return review.admit(body, ctx)


# --------------------------------------------------------------------------- doctor


def doctor(
    image: str,
    region_flag: str | None,
    policy_file: str | None,
    options: ProbeOptions,
    env: Mapping[str, str],
    output: str,
    out: IO[str],
) -> int:
    """``ecr-webhook probe IMAGE``: each candidate, its answer and latency, and the pick.

    Exit status 0 when the webhook would keep or rewrite the image, 1 when it
    would keep it with a warning (no candidate available), 2 on bad input.
    """
    from webhook.core.errors import InputError
    from webhook.core.imageref import parse as parse_ref
    from webhook.core.plan import Action, candidates_of, plan_pod
    from webhook.core.plan import probe_requests as pod_requests
    from webhook.core.policy import resolve_region
    from webhook.dryrun import load_policy_file

    try:
        ref = parse_ref(image)
    except Exception as exc:
        raise InputError(f"IMAGE {image!r}: {exc}") from None
    policy = options.apply(load_policy_file(policy_file))
    region = resolve_region(region_flag, policy, env)
    ctx = PlanContext.build(policy, region)
    spec = {"containers": [{"name": "probe", "image": image}]}
    refs = {str(r): r for r in (ref, *pod_requests({}, spec, None, ctx))}
    prober = Prober(options.settings(policy))
    try:
        prober.label_hosts = mirror_hosts(policy)
        prober.prepare(refs.values())
        evidence = prober.probe_all(list(refs.values()))
    finally:
        prober.close()
    ctx = ctx.with_evidence(evidence)
    (d,) = plan_pod({}, spec, None, ctx).decisions
    rows = [(str(ref), "original", evidence.get(str(ref)))]
    rows += [(str(c), rule, evidence.get(str(c))) for c, rule in candidates_of(image, ctx)]
    pick = d.target if d.action is Action.REWRITE else (image if d.action is Action.KEEP else None)
    if output == "json":
        doc = {
            "schemaVersion": "v1", "image": image, "region": region,
            "candidates": [
                {"candidate": c, "rule": rule,
                 **({"outcome": None, "latencyMs": None, "cached": False} if p is None
                    else p.as_json()), "detail": p.detail if p else "not probed"}
                for c, rule, p in rows
            ],
            "decision": {"action": str(d.action), "to": d.target, "reason": str(d.reason),
                         "rule": d.rule, "detail": d.detail},
            "pick": pick,
        }  # fmt: skip
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")
    else:
        width = max(len(c) for c, _, _ in rows)
        out.write(f"{'CANDIDATE':<{width}}  {'RULE':<19} {'OUTCOME':<13} {'LATENCY':>9}  "
                  "CACHED  DETAIL\n")  # fmt: skip
        for c, rule, p in rows:
            if p is None:
                out.write(f"{c:<{width}}  {rule:<19} {'-':<13} {'-':>9}  -       not probed\n")
                continue
            out.write(f"{c:<{width}}  {rule:<19} {p.outcome!s:<13} {p.latency_ms:>6.0f} ms  "
                      f"{'yes' if p.cached else 'no':<6}  {p.detail}\n")  # fmt: skip
        out.write(f"region: {region or '(none)'}\n")
        if d.action is Action.REWRITE:
            out.write(f"pick: {d.target} (rewrite: {d.reason}, {d.rule}; {d.detail})\n")
        elif d.action is Action.KEEP:
            out.write(f"pick: {image} (kept: {d.reason}; {d.detail})\n")
        else:
            out.write(f"pick: none, the image is kept with a warning ({d.reason}: {d.detail})\n")
    return 1 if d.action is Action.WARN else 0
