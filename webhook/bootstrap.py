"""``ecr-webhook certs bootstrap``: self-signed certificates in the cluster.

Creates or renews the ``kubernetes.io/tls`` Secret that the server mounts, and
patches the Secret's CA into the ``caBundle`` of every webhook of the
MutatingWebhookConfiguration.  The bootstrap Job runs it at install and a
CronJob daily (manifests/components/self-signed).

Contract:

* **Idempotent.**  A run with nothing to do sends no write to the apiserver
  and says so ("no changes"); the Secret's resourceVersion stays the same.
* **Renews** when the Secret is missing, invalid (a key absent, unparsable
  PEM, key and certificate not a pair, certificate not signed by ``ca.crt``),
  expiring within ``renew_before``, or its SANs do not cover the Service's
  names (``webhook.certs.service_names``).
* **Rotation without a gap.**  A renewed ``ca.crt`` holds the new CA followed
  by the previous one (while that is unexpired), and that whole bundle goes
  into ``caBundle``; so pods still serving the old certificate until the
  kubelet refreshes their Secret volume (about a minute) keep being trusted.
* **Least privilege.**  It reads and writes only its own Secret (get, create,
  update) and its own webhook configuration (get, patch); see
  manifests/components/self-signed/rbac.yaml.
* **Optimistic concurrency.**  Secrets are replaced with the resourceVersion
  that was read and caBundles patched with JSON-patch ``test`` operations, so
  a concurrent writer makes this run fail (and the Job retry) rather than
  overwrite it.

The ``kubernetes`` client is imported inside ``run`` only (``ecr-webhook
--help`` must not import it).  The decisions (``parse_duration``,
``assess_secret``, ``ca_bundle_patch``) are plain functions over data, tested
without a cluster; ``run`` is the thin shell, tested against a real
kube-apiserver in tests/e2e/test_bootstrap.py.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from yaml import YAMLError

from webhook import certs
from webhook.core.errors import BootstrapError, ConfigError

SECRET_TYPE = "kubernetes.io/tls"  # nosec B105  # a Secret type name, not a password
FIELD_MANAGER = "ecr-webhook-bootstrap"
# Kubernetes object names: a Service and a Namespace are DNS-1035/1123 labels,
# Secrets and webhook configurations DNS-1123 subdomains (apimachinery validation).
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$"
)
# Go's time.ParseDuration grammar: [-+]?([0-9]*(\.[0-9]*)?[a-z]+)+, or "0".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip


@dataclass(frozen=True)
class BootstrapOptions:
    """What to bootstrap; the flags of ``ecr-webhook certs bootstrap``."""

    namespace: str = "ecr-webhook"
    service: str = "ecr-webhook"
    secret: str = "ecr-webhook-tls"
    webhook: str = "ecr-webhook"
    renew_before: str = "720h"  # a Go duration, as cert-manager's renewBefore
    days: int = 365
    kubeconfig: str | None = None  # None: the in-cluster ServiceAccount


@dataclass(frozen=True)
class Assessment:
    """Whether the Secret must be (re)written, and why (one line for humans)."""

    renew: bool
    reason: str
    not_after: dt.datetime | None = None


# ---------------------------------------------------------------- pure helpers


def parse_duration(text: str, flag: str = "--renew-before") -> dt.timedelta:
    """Parse a Go duration (``720h``, ``1h30m``, ``90s``) into a timedelta.

    Negative durations are refused: "renew when it expires within -1h" has no
    sensible meaning.
    """
    s = text
    if s.startswith("+"):
        s = s[1:]
    if s == "0":
        return dt.timedelta(0)
    pos, seconds = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ConfigError(
            f"{flag} {text!r}: not a duration such as 720h or 1h30m "
            "(units h, m, s, ms, us, ns; no days: write 30 days as 720h)"
        )
    return dt.timedelta(seconds=seconds)


def validate_options(opts: BootstrapOptions) -> dt.timedelta:
    """Check the options before touching the cluster; returns ``renew_before``."""
    for flag, value, pattern in (
        ("--namespace", opts.namespace, _DNS_LABEL),
        ("--service", opts.service, _DNS_LABEL),
        ("--secret", opts.secret, _DNS_SUBDOMAIN),
        ("--webhook", opts.webhook, _DNS_SUBDOMAIN),
    ):
        if not pattern.match(value):
            raise ConfigError(f"{flag} {value!r}: not a valid Kubernetes object name")
    if opts.days < 1:
        raise ConfigError(f"--days {opts.days}: must be at least 1")
    renew_before = parse_duration(opts.renew_before)
    validity = dt.timedelta(days=opts.days)
    if renew_before >= validity:
        # Otherwise every fresh certificate is already due and each run renews:
        # the bootstrap would never be idempotent.
        raise ConfigError(
            f"--renew-before {opts.renew_before}: must be shorter than the validity "
            f"(--days {opts.days} = {opts.days * 24}h)"
        )
    return renew_before


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64decode(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _load_pems(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    hash_alg = cert.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        elif isinstance(key, rsa.RSAPublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hash_alg)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _same_public_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt))


def assess_secret(
    secret: Mapping[str, Any] | None,
    names: Sequence[str],
    renew_before: dt.timedelta,
    now: dt.datetime,
) -> Assessment:
    """Decide whether the TLS Secret (a decoded JSON object, or None) must be renewed."""
    if secret is None:
        return Assessment(True, "does not exist")
    data = secret.get("data") or {}
    pems: dict[str, bytes] = {}
    for key in (certs.CA_FILE, certs.CERT_FILE, certs.KEY_FILE):
        raw = _b64decode(data.get(key))
        if not raw:
            return Assessment(True, f"has no {key}")
        pems[key] = raw
    chain = _load_pems(pems[certs.CERT_FILE])
    cas = _load_pems(pems[certs.CA_FILE])
    if not chain:
        return Assessment(True, f"{certs.CERT_FILE} is not a PEM certificate")
    if not cas:
        return Assessment(True, f"{certs.CA_FILE} is not a PEM certificate")
    leaf = chain[0]
    if not _same_public_key(leaf, pems[certs.KEY_FILE]):
        return Assessment(True, f"{certs.KEY_FILE} is not the key of {certs.CERT_FILE}")
    if not any(_signed_by(leaf, ca) for ca in cas):
        return Assessment(True, f"{certs.CERT_FILE} is not signed by {certs.CA_FILE}")
    expiry = leaf.not_valid_after_utc
    if leaf.not_valid_before_utc > now:
        return Assessment(True, f"is not valid before {_iso(leaf.not_valid_before_utc)}")
    if expiry - now <= renew_before:
        hours = int(renew_before.total_seconds() // 3600)
        return Assessment(True, f"expires {_iso(expiry)}, within {hours}h", expiry)
    dns, _ips = certs.sans_of(pems[certs.CERT_FILE])
    missing = [n for n in names if n not in dns]
    if missing:
        return Assessment(True, f"SANs {dns} do not cover {missing}", expiry)
    return Assessment(False, f"valid until {_iso(expiry)}", expiry)


def next_ca_bundle(
    new_ca_pem: bytes, old_secret: Mapping[str, Any] | None, now: dt.datetime
) -> bytes:
    """The ``ca.crt`` of a renewed Secret: the new CA, then the previous one if unexpired.

    Keeping one previous CA bridges the time until every server pod serves the
    new certificate; older CAs are dropped, so the bundle never grows past two.
    """
    if old_secret is None:
        return new_ca_pem
    old = _b64decode((old_secret.get("data") or {}).get(certs.CA_FILE))
    previous = _load_pems(old) if old else []
    if previous and previous[0].not_valid_after_utc > now:
        return new_ca_pem + previous[0].public_bytes(serialization.Encoding.PEM)
    return new_ca_pem


def ca_bundle_patch(config: Mapping[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """JSON-patch operations that set caBundle to ``ca_pem`` where it differs.

    Each ``add`` (which replaces an existing member, RFC 6902) is preceded by a
    ``test`` of that webhook's name, so the patch fails rather than touching the
    wrong entry if the list changed since it was read.  Empty: nothing to do.
    """
    want = base64.b64encode(ca_pem).decode("ascii")
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(config.get("webhooks") or []):
        if (hook.get("clientConfig") or {}).get("caBundle") == want:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.get("name")})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
    return ops


def secret_body(
    opts: BootstrapOptions, bundle: certs.Bundle, ca_pem: bytes, old: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Secret to create, or to replace ``old`` with (keeping its labels/annotations)."""
    meta: dict[str, Any] = {"name": opts.secret, "namespace": opts.namespace}
    if old is not None:
        old_meta = old.get("metadata") or {}
        for key in ("resourceVersion", "labels", "annotations"):
            if key in old_meta:
                meta[key] = old_meta[key]
    else:
        meta["labels"] = {"app.kubernetes.io/name": "ecr-webhook",
                          "app.kubernetes.io/managed-by": FIELD_MANAGER}  # fmt: skip

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": SECRET_TYPE,
        "data": {
            certs.CA_FILE: b64(ca_pem),
            certs.CERT_FILE: b64(bundle.cert_pem),
            certs.KEY_FILE: b64(bundle.key_pem),
        },
    }


# ------------------------------------------------------------------ the shell


def _api_error(exc: Any, doing: str, hint: str = "") -> BootstrapError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    message = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:200]
    if status == 403 and not hint:
        hint = "its RBAC does not allow this (see manifests/components/self-signed/rbac.yaml)"
    detail = f"HTTP {status} {reason}" if status else str(exc)
    text = f"{doing}: {detail}" + (f": {message}" if message else "")
    return BootstrapError(text + (f"; {hint}" if hint else ""))


def _client(kubeconfig: str | None) -> Any:
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return client.ApiClient(configuration)
    except (ConfigException, YAMLError, OSError, ValueError, TypeError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration"
        hint = "" if kubeconfig else " (outside a pod, pass --kubeconfig)"
        why = " ".join(str(exc).split())  # one line, whatever the loader said
        raise ConfigError(f"{where}: cannot load it: {why}{hint}") from None


def _read(call: Any, *args: str) -> dict[str, Any] | None:
    """GET an object as plain JSON; None when it does not exist (HTTP 404)."""
    from kubernetes.client.exceptions import ApiException

    try:
        response = call(*args, _preload_content=False)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    doc = json.loads(response.data)
    assert isinstance(doc, dict)  # nosec B101  # mypy narrowing; the line above checked it
    return doc


def run(
    opts: BootstrapOptions, *, out: TextIO | None = None, now: dt.datetime | None = None
) -> int:
    """Create or renew the TLS Secret and patch the caBundle; print what was done.

    Returns 0 on success (including "no changes"); raises ``ConfigError`` for bad
    options or kubeconfig and ``BootstrapError`` for what the cluster refused.
    """
    out = out or sys.stdout
    renew_before = validate_options(opts)
    now = now or dt.datetime.now(dt.UTC)
    names = certs.service_names(opts.service, opts.namespace)
    secret_ref = f"secret {opts.namespace}/{opts.secret}"
    webhook_ref = f"mutatingwebhookconfiguration {opts.webhook}"

    # Lazy: `ecr-webhook --help` and the other commands never load the client.
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    changes = 0
    ops_sent = False
    with _client(opts.kubeconfig) as api:
        core = client.CoreV1Api(api)
        admission = client.AdmissionregistrationV1Api(api)
        try:
            # 1. The Secret.
            doing = f"reading {secret_ref}"
            secret = _read(core.read_namespaced_secret, opts.secret, opts.namespace)
            if secret is not None and secret.get("type") != SECRET_TYPE:
                raise BootstrapError(
                    f"{secret_ref} has type {secret.get('type')!r}, not {SECRET_TYPE!r}, and the "
                    f"type of a Secret cannot be changed: delete it (kubectl -n {opts.namespace} "
                    f"delete secret {opts.secret}) and run again"
                )
            verdict = assess_secret(secret, names, renew_before, now)
            if verdict.renew:
                bundle = certs.build_certificate(names, days=opts.days, now=now)
                ca_pem = next_ca_bundle(bundle.ca_pem, secret, now)
                body = client.V1Secret.model_validate(secret_body(opts, bundle, ca_pem, secret))
                if secret is None:
                    doing = f"creating {secret_ref}"
                    core.create_namespaced_secret(
                        opts.namespace, body, field_manager=FIELD_MANAGER, _preload_content=False
                    )
                    action = "created"
                else:
                    doing = f"renewing {secret_ref}"
                    core.replace_namespaced_secret(
                        opts.secret, opts.namespace, body,
                        field_manager=FIELD_MANAGER, _preload_content=False,
                    )  # fmt: skip
                    action = f"renewed ({secret_ref} {verdict.reason})"
                changes += 1
                print(f"{secret_ref}: {action}; valid until {_iso(bundle.not_after)} "
                      f"for {', '.join(names)}", file=out)  # fmt: skip
            else:
                ca_pem = base64.b64decode((secret or {}).get("data", {})[certs.CA_FILE])
                print(f"{secret_ref}: unchanged ({verdict.reason}, renewal due within "
                      f"{opts.renew_before} of expiry)", file=out)  # fmt: skip

            # 2. The caBundle of every webhook in the configuration.
            doing = f"reading {webhook_ref}"
            config = _read(admission.read_mutating_webhook_configuration, opts.webhook)
            if config is None:
                raise BootstrapError(
                    f"{webhook_ref} does not exist: apply the manifests first "
                    "(kubectl apply -f manifests/install.yaml), then run again"
                )
            if not config.get("webhooks"):
                raise BootstrapError(f"{webhook_ref} has no webhooks to patch")
            ops = ca_bundle_patch(config, ca_pem)
            if ops:
                doing = f"patching the caBundle of {webhook_ref}"
                ops_sent = True
                admission.patch_mutating_webhook_configuration(
                    opts.webhook, ops, field_manager=FIELD_MANAGER,
                    _content_type="application/json-patch+json", _preload_content=False,
                )  # fmt: skip
                changes += 1
                print(f"{webhook_ref}: caBundle patched in {len(ops) // 2} of "
                      f"{len(config['webhooks'])} webhook(s)", file=out)  # fmt: skip
            else:
                print(f"{webhook_ref}: caBundle unchanged (already the Secret's ca.crt)", file=out)
        except ApiException as exc:
            hint = ""
            if exc.status == 409:
                hint = "another writer changed it meanwhile; run again"
            elif exc.status == 422 and ops_sent:
                hint = "the webhook list changed since it was read (a patch test failed); run again"
            raise _api_error(exc, doing, hint) from None
        except HTTPError as exc:
            raise BootstrapError(f"{doing}: cannot reach the apiserver: {exc}") from None

    print("no changes" if changes == 0 else f"{changes} change(s) made", file=out)
    return 0
