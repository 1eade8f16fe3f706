"""Hot reload of the policy and of the serving certificate.  A shell module.

Both follow files that Kubernetes updates in place:

* the policy ConfigMap, mounted at /etc/ecr-webhook/policy,
* the TLS Secret, mounted at /etc/ecr-webhook/tls, and
* the client CA of ``serve --client-ca``, from a Secret or a ConfigMap.

The kubelet updates such volumes atomically by a symlink swap: the files are
symlinks through ``..data``, which points at a timestamped directory; an update
writes a new directory and renames a new ``..data`` symlink over the old one
(kubernetes pkg/volume/util/atomic_writer.go).  ``os.stat`` follows the
symlinks, so the identity of the file now behind a path (device, inode, mtime,
size) changes exactly when such a swap, or an ordinary rewrite, happens.

A check is one ``stat`` per file, cheap enough to run on every admission (the
policy) and every new TLS connection (the certificate, its key and the client
CA), so a change is seen by the very next request or connection, with no
polling thread and no restart.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from cryptography import x509

from webhook.core.errors import ConfigError, EcrWebhookError, PolicyError
from webhook.core.plan import Oracle, PlanContext
from webhook.core.policy import Policy, check_region, load_policy, resolve_region

Signature = tuple[int, int, int, int]
# Logged (with the region) at start and after a reload to such a region (issue 11).
UNKNOWN_REGION_MESSAGE = (
    "cluster region not in the registry data: its EKS account is unknown, so images "
    "in it are not judged (other regions still are); update ecr-webhook"
)
ReloadListener = Callable[[str, BaseException | None], None]


def signature(path: str) -> Signature | None:
    """Identity of the file now behind ``path`` (symlinks followed); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{what} {path}: cannot read it: {why}") from None


def build_context(
    policy_file: str | None,
    region_flag: str | None,
    env: Mapping[str, str],
    oracle: Oracle | None = None,
    fallback_regions: tuple[str, ...] = (),
) -> PlanContext:
    """Load and validate the policy and resolve the region.  Raises EcrWebhookError.

    With no policy file the defaults apply (``Policy()``).  ``fallback_regions``
    (``--fallback-region``) replace the policy's ``fallbackRegions`` when given.
    """
    if policy_file is None:
        policy = Policy()
    else:
        policy = load_policy(read_text(policy_file, "--policy"), source=policy_file)
    if fallback_regions:
        regions = tuple(check_region(r, "--fallback-region", "command line")
                        for r in fallback_regions)  # fmt: skip
        policy = replace(policy, fallback_regions=regions)
    region = resolve_region(region_flag, policy, env)
    return PlanContext.build(policy, region, oracle=oracle)


class PolicyHolder:
    """The current ``PlanContext``, rebuilt when the policy file changes.

    A changed file is validated first and swapped in only when valid.  An
    invalid one (bad YAML, a bad field, an unknown region, a missing file)
    keeps the last good policy; ``on_reload("failure", error)`` is called once
    per change so it is logged and counted once, not on every request.
    """

    def __init__(
        self,
        policy_file: str | None,
        region_flag: str | None,
        env: Mapping[str, str],
        *,
        oracle: Oracle | None = None,
        on_reload: ReloadListener | None = None,
        fallback_regions: tuple[str, ...] = (),
    ) -> None:
        self.policy_file = policy_file
        self.region_flag = region_flag
        self.env = env
        self.oracle = oracle
        self.fallback_regions = fallback_regions
        self.on_reload = on_reload
        self._lock = threading.Lock()
        self._seen = signature(policy_file) if policy_file else None
        # The first load raises: there is no last good policy to keep.
        self._context = build_context(policy_file, region_flag, env, oracle, fallback_regions)

    @property
    def loaded(self) -> bool:
        return self._context is not None

    def context(self) -> PlanContext:
        """The context to decide with; reloads first if the file changed."""
        if self.policy_file is not None and signature(self.policy_file) != self._seen:
            self._reload()
        return self._context

    def _reload(self) -> None:
        assert self.policy_file is not None  # nosec B101  # called only with a policy file; mypy narrowing
        # Non-blocking: the thread that wins reloads, the others go on with the
        # current policy instead of queueing behind a parse.
        if not self._lock.acquire(blocking=False):
            return
        try:
            sig = signature(self.policy_file)
            if sig == self._seen:
                return
            self._seen = sig
            try:
                ctx = build_context(self.policy_file, self.region_flag, self.env, self.oracle,
                                    self.fallback_regions)  # fmt: skip
            except EcrWebhookError as exc:
                if self.on_reload is not None:
                    self.on_reload("failure", exc)
                return
            self._context = ctx
            if self.on_reload is not None:
                self.on_reload("success", None)
        finally:
            self._lock.release()


# The identities of the certificate, the key and the client CA (None without --client-ca).
TlsSignature = tuple[Signature | None, Signature | None, Signature | None]


@dataclass(frozen=True)
class LoadedCertificate:
    context: ssl.SSLContext
    not_after: dt.datetime
    signature: TlsSignature


def tls_signature(cert_file: str, key_file: str, client_ca: str | None) -> TlsSignature:
    ca = signature(client_ca) if client_ca is not None else None
    return (signature(cert_file), signature(key_file), ca)


def server_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server SSLContext, TLS 1.2 minimum, with the given certificate and key.

    TLS 1.2 is the floor the kube-apiserver itself accepts by default and the
    one the issue requires; Python's defaults already exclude compression and
    weak ciphers.  With ``client_ca`` see ``require_client_certificates``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    if client_ca is not None:
        require_client_certificates(ctx, client_ca)
    return ctx


def require_client_certificates(ctx: ssl.SSLContext, client_ca: str) -> None:
    """``serve --client-ca``: a client must present a certificate signed by that CA.

    Otherwise the handshake fails.  The kube-apiserver presents one when its
    AdmissionConfiguration gives the webhook a kubeconfig with
    ``client-certificate`` (Kubernetes docs, "Authenticate apiservers").
    Raises ssl.SSLError (not PEM, no certificate in it) or OSError.
    """
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=client_ca)


def load_certificate(
    cert_file: str, key_file: str, client_ca: str | None = None
) -> LoadedCertificate:
    """Load the pair (and the client CA); ConfigError names the file and what is wrong.

    The files' signatures are taken before they are read, so a file replaced
    while it is being read differs from the recorded signature at the next
    check, and is read again then.
    """
    sig = tls_signature(cert_file, key_file, client_ca)
    for path, flag, seen in ((cert_file, "--cert-file", sig[0]), (key_file, "--key-file", sig[1])):
        if seen is None:
            raise ConfigError(
                f"{flag} {path}: no such file; create it with 'ecr-webhook certs generate' "
                "or mount the TLS Secret"
            )
    try:
        ctx = server_context(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--cert-file {cert_file} / --key-file {key_file}: cannot load the pair: {exc}"
        ) from None
    if client_ca is not None:
        try:
            require_client_certificates(ctx, client_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"--client-ca {client_ca}: cannot load it as PEM CA certificates: {why}"
            ) from None
    with open(cert_file, "rb") as f:
        not_after = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc
    return LoadedCertificate(ctx, not_after, sig)


class CertificateHolder:
    """The serving SSLContext, rebuilt when the certificate, key or client CA file changes.

    gunicorn asks its ``ssl_context`` hook for a context on every new
    connection; ``context()`` answers with the cached one after one ``stat``
    per file (two, three with ``client_ca``), and loads the files again when
    any of them changed.  So a new client CA (a Secret or ConfigMap update)
    applies to the next connection, like a new pair; connections already
    established keep the context they were accepted with.  Files that fail to
    load (say a certificate already swapped, its key not yet; or a client CA
    that is not PEM) keep the previous context, whole: ``on_reload("failure",
    error)`` is called once per change, and the files are retried when one of
    them changes again.
    """

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        *,
        on_reload: ReloadListener | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        client_ca: str | None = None,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca = client_ca
        self.on_reload = on_reload
        self.now = now
        self._lock = threading.Lock()
        self._loaded: LoadedCertificate | None = None
        self._failed: TlsSignature | None = None
        self.error: str | None = None
        sig = self._signature()
        try:
            self._loaded = load_certificate(cert_file, key_file, client_ca)
        except ConfigError as exc:
            self._failed = sig
            self.error = str(exc)

    def _signature(self) -> TlsSignature:
        return tls_signature(self.cert_file, self.key_file, self.client_ca)

    def _changed(self) -> bool:
        current = self._loaded.signature if self._loaded is not None else None
        return self._signature() not in (current, self._failed)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection.  Raises ConfigError if none ever loaded."""
        if self._changed():
            with self._lock:
                if self._changed():
                    self._reload()
        if self._loaded is None:
            raise ConfigError(self.error or "no serving certificate loaded")
        return self._loaded.context

    def _reload(self) -> None:
        sig = self._signature()
        try:
            loaded = load_certificate(self.cert_file, self.key_file, self.client_ca)
        except ConfigError as exc:
            self._failed = sig
            self.error = str(exc)
            if self.on_reload is not None:
                self.on_reload("failure", exc)
            return
        self._loaded, self._failed, self.error = loaded, None, None
        if self.on_reload is not None:
            self.on_reload("success", None)

    def problem(self) -> str | None:
        """Why the certificate is not fit to serve, or None (for /readyz)."""
        if self._changed():
            with self._lock:
                if self._changed():
                    self._reload()
        if self._loaded is None:
            return self.error or "no serving certificate loaded"
        if self._loaded.not_after <= self.now():
            return f"certificate {self.cert_file} expired at {self._loaded.not_after.isoformat()}"
        return None


def policy_error_text(exc: BaseException) -> str:
    """One line for a policy that failed to load."""
    if isinstance(exc, PolicyError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
