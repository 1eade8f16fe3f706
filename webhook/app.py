"""The Flask application: ``create_app(config)``.  A shell module.

The view is thin (STYLE.md habit 1): it decodes the body, calls the pure
``review.admit``, records (metrics, audit, log) and encodes.  Every exception
is mapped to an answer in exactly one place, ``_map_exception``:

=================================  =====  ============================================
what went wrong                    HTTP   answer
=================================  =====  ============================================
Content-Type not application/json  415    a Kubernetes ``Status`` naming the type
body over 7 MiB                    413    a ``Status`` (under ``serve`` the worker
                                          answers it before the body arrives)
not JSON / not an AdmissionReview  400    a ``Status`` saying what is wrong
(``ReviewError``: no uid, unknown
apiVersion, ...)
anything else (a bug, a failing    200    ``review.fail_open``: allowed, no patch, one
oracle, ...)                              warning; counted, logged and audited
=================================  =====  ============================================

So the webhook never answers 5xx and a worker never dies of a request: the
kube-apiserver applies ``failurePolicy`` only when a webhook does not answer,
and an internal error must not block a pod.

``/healthz`` (liveness) and ``/readyz`` (readiness: a policy is loaded and the
serving certificate is loaded and unexpired) are served on the TLS port too,
where the kubelet probes them with ``scheme: HTTPS``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length

from webhook.auditlog import AuditLog, AuditSink
from webhook.background import Periodic
from webhook.config import MAX_BODY, ServeConfig
from webhook.core import jsonc, review
from webhook.core.audit import build_record
from webhook.core.ecr import DATA_VERSION
from webhook.core.errors import ReviewError
from webhook.core.plan import Oracle, PlanContext
from webhook.core.policy import RegionTarget, unknown_region
from webhook.logs import Log, Throttle
from webhook.metrics import Metrics, errno_label, multiprocess_dir
from webhook.reload import (
    UNKNOWN_REGION_MESSAGE,
    CertificateHolder,
    PolicyHolder,
    policy_error_text,
)

# An oversized body up to this size is read and discarded before the 413, so
# the client, still sending, gets the answer instead of a reset connection
# (gunicorn drains at most 64 KiB of an unread body, then closes).
DRAIN_LIMIT = 2 * MAX_BODY
JSON = "application/json"
AUDIT_REPORT_INTERVAL = 10.0  # seconds between two "audit record not written" lines
# At most this long between two writes of deferred audit records (AuditLog.write).
DEFERRED_FLUSH_SECONDS = 0.05

Admit = Callable[[object, PlanContext], review.Outcome]


class BodyProblem(Exception):
    """The HTTP request cannot carry an AdmissionReview (415, 413, 400)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Answer:
    status: int
    document: Mapping[str, Any]
    outcome: review.Outcome | None = None


def decode(environ: dict[str, Any], read_timeout: float = 5.0) -> object:
    """The JSON body of the request ``environ`` (WSGI) carries.  Raises BodyProblem.

    A body over ``MAX_BODY`` gets 413 whether its length is declared
    (``Content-Length``) or only found while reading (chunked); the excess is
    read and discarded for at most ``read_timeout`` seconds first, so a client
    still sending sees the answer rather than a reset.

    Reads the environ itself, with werkzeug's parsers, rather than through
    ``flask.request``: each attribute of that proxy is a context lookup, and
    this runs on every admission.
    """
    content_type = environ.get("CONTENT_TYPE", "")
    # The kube-apiserver sends exactly "application/json" (k8s.io/apiserver
    # pkg/util/webhook: the rest client's ContentType); anything else is parsed.
    if content_type != JSON and parse_options_header(content_type)[0].lower() != JSON:
        raise BodyProblem(415, f"Content-Type must be {JSON}, got {content_type or '(none)'}")
    stream = environ["wsgi.input"]
    length = get_content_length(environ)
    deadline = time.monotonic() + read_timeout
    if length is not None and length > MAX_BODY:
        if length <= DRAIN_LIMIT:
            _discard(stream, length, deadline)
        raise BodyProblem(413, f"body of {length} bytes is over the limit of {MAX_BODY}")
    if length is None:
        # Chunked: no length up front.  Werkzeug would silently cut the stream
        # at MAX_CONTENT_LENGTH (then "not valid JSON"), so read it here, one
        # byte past the limit at most.
        raw = _read_at_most(stream, MAX_BODY + 1, deadline)
        if len(raw) > MAX_BODY:
            _discard(stream, DRAIN_LIMIT - len(raw), deadline)
            raise BodyProblem(413, f"chunked body is over the limit of {MAX_BODY} bytes")
    else:
        raw = _read_at_most(stream, length, deadline)  # wsgi.input itself: no werkzeug wrapper
    try:
        return jsonc.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BodyProblem(400, f"the body is not valid JSON: {exc}") from None


def _read_at_most(stream: Any, limit: int, deadline: float) -> bytes:
    """Up to ``limit`` bytes of the body, read before ``deadline`` (monotonic).

    Under ``serve`` the worker hands a thread a request only once it has
    arrived (and answers a body over the limit itself), except one it cannot
    frame: such a body may trickle in, and without a deadline it would hold
    the thread for as long as the client keeps sending a byte now and then.
    Served by anything else, every body is read here.
    """
    parts: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() >= deadline:
            raise BodyProblem(400, "the body did not arrive within the read timeout")
        try:
            chunk = stream.read(min(limit - size, 64 * 1024))
        except OSError:  # the socket's own timeout, or the client went away
            raise BodyProblem(400, "the body did not arrive within the read timeout") from None
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _discard(stream: Any, length: int, deadline: float) -> None:
    """Read and drop up to ``length`` bytes, until ``deadline`` (monotonic) at most."""
    try:
        while length > 0 and time.monotonic() < deadline:
            chunk = stream.read(min(length, 64 * 1024))
            if not chunk:
                return
            length -= len(chunk)
    except OSError:  # the socket's own timeout, or the client went away
        return


def _map_exception(body: object, exc: Exception) -> Answer:
    """The one place where an exception becomes an HTTP answer (see the module doc)."""
    if isinstance(exc, BodyProblem):
        return Answer(exc.status, review.status_document(exc.status, exc.message))
    if isinstance(exc, RequestEntityTooLarge):
        return Answer(413, review.status_document(413, f"body is over {MAX_BODY} bytes"))
    if isinstance(exc, ReviewError):
        return Answer(400, review.status_document(400, str(exc)))
    if isinstance(exc, HTTPException) and exc.code is not None and 400 <= exc.code < 500:
        return Answer(exc.code, review.status_document(exc.code, exc.description or exc.name))
    try:
        outcome = review.fail_open(body, exc)
    except ReviewError as envelope:  # the body never was an AdmissionReview
        return Answer(400, review.status_document(400, str(envelope)))
    return Answer(200, outcome.review, outcome)


def _probing_admit(config: ServeConfig, policy: PolicyHolder, metrics: Metrics, log: Log) -> Admit:
    """``review.admit`` with registry probes when ``--probe`` or the policy asks for them.

    The prober (threads, boto3 clients, HTTP pools) is made in the worker
    process, never before gunicorn forks: with ``--probe`` at once, with its
    ECR clients warmed in the background for the regions of the policy's
    candidates; when only a reloaded policy turns probing on, at the first
    admission that needs it.
    """
    from webhook.prober import ProbeOptions, Prober, ProbingAdmit

    options = ProbeOptions(config.probe, config.fallback_regions, config.registry_endpoints,
                           config.registry_ca, config.probe_timeout)  # fmt: skip
    lock = threading.Lock()
    made: list[Prober] = []

    def prober() -> Prober:
        if not made:
            with lock:
                if not made:
                    ctx = policy.context()
                    runtime = multiprocess_dir()  # the server's private directory
                    shared = os.path.join(runtime, "probes") if runtime else None
                    made.append(Prober(options.settings(ctx.policy), observer=metrics,
                                       shared_dir=shared))  # fmt: skip
        return made[0]

    def probe_failed(exc: BaseException) -> None:
        metrics.errors.labels("probe").inc()
        log.error("probing failed, admission decided on static facts", err=exc)

    if config.probe:
        ctx = policy.context()
        regions = {t.region or ctx.cluster.region for t in ctx.policy.candidates
                   if isinstance(t, RegionTarget)}  # fmt: skip
        prober().warm(r for r in regions if r)
    return ProbingAdmit(prober, enabled=config.probe, budget=config.probe_timeout,
                        default_budget=config.probe_budget_seconds,
                        on_error=probe_failed)  # fmt: skip


def create_app(
    config: ServeConfig,
    *,
    audit: AuditSink | None = None,
    metrics: Metrics | None = None,
    log: Log | None = None,
    oracle: Oracle | None = None,
    certificate: CertificateHolder | None = None,
    env: Mapping[str, str] | None = None,
    admit: Admit = review.admit,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """Build the app from an immutable config (STYLE.md habit 8).

    Collaborators are injectable for tests and for the launcher: ``audit`` (by
    default an ``AuditLog`` on ``config.audit_log``), ``metrics``, ``log``,
    ``oracle`` (passed to the planner; a test injects a failing one),
    ``certificate`` (the launcher shares its reloading holder so /readyz sees
    what TLS serves), ``env`` (AWS_REGION), ``admit`` and ``clock``.

    Raises EcrWebhookError when the initial policy is invalid: there is no last
    good policy to fall back on.
    """
    log = log or Log(verbosity=config.log_verbosity)
    metrics = metrics or Metrics()
    if audit is None:
        audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes,
                         backups=config.audit_backups)  # fmt: skip

    def region_check(report: bool = True) -> None:
        """The gauge, and (after a reload; the launcher says it once at start) the log line."""
        region = policy.context().cluster.region
        unknown = unknown_region(region)
        metrics.region_unknown.set(1 if unknown else 0)
        if unknown and report:
            log.error(UNKNOWN_REGION_MESSAGE, err=f"unknown region {region}", region=region,
                      dataVersion=DATA_VERSION)  # fmt: skip

    def policy_reloaded(result: str, error: BaseException | None) -> None:
        metrics.policy_reloads.labels(result).inc()
        if error is None:
            log.info("policy reloaded", source=config.policy_file)
            region_check()
        else:
            metrics.errors.labels("policy").inc()
            log.error("policy rejected, keeping the last good policy",
                      err=policy_error_text(error), source=config.policy_file)  # fmt: skip

    # The client CA is reloaded with the pair, as one context (reload.CertificateHolder).
    tls_files: dict[str, Any] = {"certFile": config.cert_file}
    if config.client_ca is not None:
        tls_files["clientCa"] = config.client_ca

    def certificate_reloaded(result: str, error: BaseException | None) -> None:
        metrics.certificate_reloads.labels(result).inc()
        if error is None:
            log.info("serving certificate reloaded", **tls_files)
        else:
            metrics.errors.labels("certificate").inc()
            log.error("serving certificate rejected, keeping the previous one", err=error,
                      **tls_files)  # fmt: skip

    policy = PolicyHolder(config.policy_file, config.region, os.environ if env is None else env,
                          oracle=oracle, on_reload=policy_reloaded,
                          fallback_regions=config.fallback_regions)  # fmt: skip
    region_check(report=False)
    if admit is review.admit:
        admit = _probing_admit(config, policy, metrics, log)
    if certificate is None:
        certificate = CertificateHolder(config.cert_file, config.key_file,
                                        client_ca=config.client_ca)  # fmt: skip
    if certificate.on_reload is None:
        # The launcher builds the holder before forking (to fail fast on a bad
        # pair); each worker's copy reports its reloads to this worker's metrics.
        certificate.on_reload = certificate_reloaded

    # A full disk fails every admission's audit write: one stderr line per 10 s.
    audit_throttle = Throttle(AUDIT_REPORT_INTERVAL)

    app = Flask("webhook")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    def refused(code: int, message: str) -> None:
        """A request the server's worker answered itself (413 from its poller)."""
        metrics.observe(code, "rejected", 0.0)
        log.info("request rejected", v=1, code=code, reason=message)


    def answer() -> Answer:
        body: object = None
        try:
            body = decode(request.environ, config.read_timeout)
            return Answer(200, {}, admit(body, policy.context()))
        except Exception as exc:  # mapped in one place, never re-raised
            return _map_exception(body, exc)

    def record(ans: Answer, received: float, seconds: float) -> None:
        outcome = ans.outcome
        if outcome is None:
            metrics.observe(ans.status, "rejected", seconds)
            log.info("request rejected", v=1, code=ans.status,
                     reason=ans.document.get("message", ""))  # fmt: skip
            return
        uid = outcome.request.get("uid")
        metrics.answered(ans.status, outcome.decision, seconds,
                         [(d.reason, d.target) for d in outcome.plan.rewrites if d.target])
        if outcome.decision == "error":
            metrics.errors.labels("admit").inc()
            err = outcome.exception or outcome.error
            log.error("internal error, pod admitted unchanged", err=err, uid=uid)
        # Another admission of this worker in progress: it (or the last one to
        # finish) writes this record with its own (AuditLog.write, "defer").
        audit_write(uid, lambda: audit.write(build_record(outcome, received, clock()),
                                             defer=len(backlog[0]) > 1))  # fmt: skip
        if log.enabled(2):
            log.info("admission", v=2, uid=uid, decision=outcome.decision,
                     operation=outcome.request.get("operation"),
                     namespace=outcome.request.get("namespace"))  # fmt: skip

    def audit_write(uid: object, write: Callable[[], None]) -> None:
        """``write`` (to the audit sink); a lost record is counted and logged, rate-limited."""
        try:
            write()
        except Exception as exc:
            lost = getattr(exc, "lost", 1)  # AuditLost: records of other threads too
            metrics.errors.labels("audit").inc(lost)
            metrics.audit_write_errors.labels(errno_label(exc)).inc(lost)
            report, held = audit_throttle.due(lost)
            if report:
                log.error("audit record not written; serving on", err=exc, uid=uid,
                          target=config.audit_log, heldBack=held)  # fmt: skip
        else:
            if audit_throttle.pending:
                log.info("audit records written again", lost=audit_throttle.settle(),
                         target=config.audit_log)  # fmt: skip

    # Whether an audit record may wait for another: the worker's count of the
    # requests handed to its threads that have not yet been through the app
    # (server.WebhookWorker.backlog, through the "backlog" hook), this one
    # included.  Served otherwise (tests, another WSGI server) nothing is
    # counted, and every record is written before its answer.
    backlog: list[Sized] = [()]

    def flush_deferred() -> None:
        if audit.pending():
            audit_write(None, audit.flush)

    # An admission that takes long (probing: up to its budget) must not hold
    # back the records deferred while it runs: they are written within
    # DEFERRED_FLUSH_SECONDS whatever the admissions in progress do, and what
    # is still queued at exit is written then (a graceful stop loses none).
    deferred_flusher = Periodic("audit-flush", DEFERRED_FLUSH_SECONDS, flush_deferred,
                                at_exit=lambda: audit_write(None, lambda: audit.flush(wait=True)))

    app.extensions["ecr_webhook"] = {
        "metrics": metrics, "audit": audit, "policy": policy, "certificate": certificate,
        "refused": refused, "backlog": lambda count: backlog.__setitem__(0, count),
    }  # fmt: skip

    @app.post("/mutate")
    def mutate() -> Response:
        received = clock()
        started = time.perf_counter()
        metrics.begin()
        try:
            ans = answer()
            document = ans.outcome.review if ans.outcome is not None else ans.document
            payload = jsonc.dumps(document)
            try:
                record(ans, received, time.perf_counter() - started)
            except Exception as exc:  # recording never fails an answer
                metrics.errors.labels("record").inc()
                log.error("recording the admission failed", err=exc)
        finally:
            metrics.end()
            # The last admission in progress (this one) writes the records
            # deferred while others were (write(..., defer=True)); otherwise the
            # flusher will, and with no thread to be had, this one does now.
            if audit.pending() and (len(backlog[0]) <= 1 or not deferred_flusher.ensure()):
                audit_write(None, audit.flush)
        return Response(payload, status=ans.status, mimetype=JSON)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        problems = [] if policy.loaded else ["no policy loaded"]
        cert_problem = certificate.problem()
        if cert_problem:
            problems.append(cert_problem)
        if problems:
            return Response("not ready: " + "; ".join(problems) + "\n", status=503,
                            mimetype="text/plain")  # fmt: skip
        return Response("ok\n", mimetype="text/plain")

    return app
