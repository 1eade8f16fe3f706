"""webhook.bootstrap's decisions, without a cluster.

The shell (``bootstrap.run`` against a real kube-apiserver) is tested in
tests/e2e/test_bootstrap.py; here are the pure parts: durations, option checks,
when a Secret is renewed and why, the rotated CA bundle and the caBundle patch.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import re
import subprocess
import sys
from typing import Any

import jsonpatch
import pytest
from cryptography import x509

from webhook import bootstrap, certs
from webhook.bootstrap import BootstrapOptions, assess_secret, parse_duration
from webhook.core.errors import ConfigError, EcrWebhookError

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
NAMES = certs.service_names("ecr-webhook", "ecr-webhook")
MONTH = dt.timedelta(hours=720)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_of(bundle: certs.Bundle, **override: bytes) -> dict[str, Any]:
    data = {"ca.crt": bundle.ca_pem, "tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem}
    data.update({k.replace("_", "."): v for k, v in override.items()})
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "ecr-webhook-tls", "namespace": "ecr-webhook",
                     "resourceVersion": "42", "labels": {"team": "platform"}},
        "data": {k: b64(v) for k, v in data.items()},
    }  # fmt: skip


@pytest.fixture(scope="module")
def fresh() -> certs.Bundle:
    return certs.build_certificate(NAMES, days=365, now=NOW)


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("720h", 720 * 3600), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("0", 0),
    ("300ms", 0.3), ("2h45m30.5s", 9930.5), ("+10m", 600), ("1us", 1e-6), ("1µs", 1e-6),
])  # fmt: skip
def test_parse_duration_accepts_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "30d", "h", "-1h", "1h-30m", "1 h", "1h ", "0x10s"])
def test_parse_duration_rejects_others_naming_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--renew-before .*not a duration"):
        parse_duration(text)


# -------------------------------------------------------------------- options


def test_default_options_are_valid() -> None:
    assert bootstrap.validate_options(BootstrapOptions()) == MONTH


@pytest.mark.parametrize(("change", "message"), [
    ({"namespace": "Ecr_Webhook"}, "--namespace 'Ecr_Webhook': not a valid"),
    ({"service": "a" * 64}, "--service"),
    ({"secret": "-tls"}, "--secret"),
    ({"webhook": ""}, "--webhook"),
    ({"days": 0}, "--days 0: must be at least 1"),
    ({"days": 30, "renew_before": "720h"}, "must be shorter than the validity"),
    ({"renew_before": "a month"}, "--renew-before 'a month'"),
])  # fmt: skip
def test_bad_options_are_refused_before_any_cluster_access(
    change: dict[str, Any], message: str
) -> None:
    opts = dataclasses.replace(BootstrapOptions(kubeconfig="/nonexistent"), **change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        bootstrap.run(opts)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BootstrapOptions().days = 1  # type: ignore[misc]


def test_unreadable_kubeconfig_is_a_config_error(tmp_path: Any) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("this: [is not a kubeconfig")
    with pytest.raises(ConfigError, match=f"--kubeconfig {bad}: cannot load it"):
        bootstrap.run(BootstrapOptions(kubeconfig=str(bad)))


def test_no_in_cluster_config_says_to_pass_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match=r"in-cluster configuration.*pass --kubeconfig"):
        bootstrap.run(BootstrapOptions())


def test_cli_maps_errors_to_one_line_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "webhook", "certs", "bootstrap", "--renew-before", "30d"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == ConfigError.exit_code
    assert proc.stderr.startswith("error: --renew-before '30d': not a duration")
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bootstrap_error_is_a_project_error() -> None:
    assert issubclass(bootstrap.BootstrapError, EcrWebhookError)


# -------------------------------------------------------------- assess_secret


def test_missing_secret_is_created(fresh: certs.Bundle) -> None:
    verdict = assess_secret(None, NAMES, MONTH, NOW)
    assert verdict.renew and verdict.reason == "does not exist"


def test_fresh_secret_is_kept(fresh: certs.Bundle) -> None:
    verdict = assess_secret(secret_of(fresh), NAMES, MONTH, NOW)
    assert not verdict.renew
    assert verdict.not_after == fresh.not_after.replace(microsecond=0)
    assert verdict.reason.startswith("valid until 2027-06-01T12:00:00Z")


def test_renewed_when_within_renew_before(fresh: certs.Bundle) -> None:
    due = fresh.not_after - MONTH + dt.timedelta(seconds=1)
    verdict = assess_secret(secret_of(fresh), NAMES, MONTH, due)
    assert verdict.renew and "within 720h" in verdict.reason
    # One second earlier it is still kept: the boundary is renew_before itself.
    assert not assess_secret(secret_of(fresh), NAMES, MONTH, due - dt.timedelta(seconds=2)).renew


def test_renewed_when_sans_do_not_cover_the_service(fresh: certs.Bundle) -> None:
    other = certs.service_names("other", "ecr-webhook")
    verdict = assess_secret(secret_of(fresh), other, MONTH, NOW)
    assert verdict.renew and "do not cover ['other'," in verdict.reason


def test_renewed_when_only_some_names_are_covered() -> None:
    partial = certs.build_certificate(NAMES[:2], days=365, now=NOW)
    verdict = assess_secret(secret_of(partial), NAMES, MONTH, NOW)
    assert verdict.renew and "ecr-webhook.ecr-webhook.svc" in verdict.reason


@pytest.mark.parametrize(("broken", "reason"), [
    ({"tls_crt": b""}, "has no tls.crt"),
    ({"ca_crt": b""}, "has no ca.crt"),
    ({"tls_crt": b"not pem"}, "tls.crt is not a PEM certificate"),
    ({"ca_crt": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
     "ca.crt is not a PEM certificate"),
    ({"tls_key": b"garbage"}, "tls.key is not the key of tls.crt"),
])  # fmt: skip
def test_renewed_when_invalid(fresh: certs.Bundle, broken: dict[str, bytes], reason: str) -> None:
    verdict = assess_secret(secret_of(fresh, **broken), NAMES, MONTH, NOW)
    assert verdict.renew and verdict.reason == reason


def test_renewed_when_key_belongs_to_another_certificate(fresh: certs.Bundle) -> None:
    other = certs.build_certificate(NAMES, days=365, now=NOW)
    verdict = assess_secret(secret_of(fresh, tls_key=other.key_pem), NAMES, MONTH, NOW)
    assert verdict.renew and verdict.reason == "tls.key is not the key of tls.crt"


def test_renewed_when_not_signed_by_the_ca(fresh: certs.Bundle) -> None:
    other = certs.build_certificate(NAMES, days=365, now=NOW)
    verdict = assess_secret(secret_of(fresh, ca_crt=other.ca_pem), NAMES, MONTH, NOW)
    assert verdict.renew and verdict.reason == "tls.crt is not signed by ca.crt"


def test_kept_when_signed_by_any_ca_of_the_bundle(fresh: certs.Bundle) -> None:
    other = certs.build_certificate(NAMES, days=365, now=NOW)
    both = other.ca_pem + fresh.ca_pem
    assert not assess_secret(secret_of(fresh, ca_crt=both), NAMES, MONTH, NOW).renew


def test_renewed_when_not_yet_valid(fresh: certs.Bundle) -> None:
    verdict = assess_secret(secret_of(fresh), NAMES, MONTH, NOW - dt.timedelta(days=1))
    assert verdict.renew and verdict.reason.startswith("is not valid before")


# ------------------------------------------------------------ rotation bundle


def test_renewed_ca_bundle_keeps_the_previous_ca_while_unexpired(fresh: certs.Bundle) -> None:
    new = certs.build_certificate(NAMES, days=365, now=NOW)
    bundle = bootstrap.next_ca_bundle(new.ca_pem, secret_of(fresh), NOW)
    cas = x509.load_pem_x509_certificates(bundle)
    assert [c.fingerprint(c.signature_hash_algorithm) for c in cas] == [  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(p).fingerprint(cas[0].signature_hash_algorithm)  # type: ignore[arg-type]
        for p in (new.ca_pem, fresh.ca_pem)
    ]
    # Only one previous CA: renewing again drops the oldest.
    newer = certs.build_certificate(NAMES, days=365, now=NOW)
    again = bootstrap.next_ca_bundle(newer.ca_pem, secret_of(new, ca_crt=bundle), NOW)
    assert again == newer.ca_pem + new.ca_pem


def test_renewed_ca_bundle_drops_an_expired_ca(fresh: certs.Bundle) -> None:
    later = NOW + dt.timedelta(days=400)
    new = certs.build_certificate(NAMES, days=365, now=later)
    assert bootstrap.next_ca_bundle(new.ca_pem, secret_of(fresh), later) == new.ca_pem
    assert bootstrap.next_ca_bundle(new.ca_pem, None, later) == new.ca_pem


def test_secret_body_keeps_metadata_for_optimistic_replace(fresh: certs.Bundle) -> None:
    old = secret_of(fresh)
    body = bootstrap.secret_body(BootstrapOptions(), fresh, fresh.ca_pem, old)
    assert body["metadata"] == {
        "name": "ecr-webhook-tls", "namespace": "ecr-webhook",
        "resourceVersion": "42", "labels": {"team": "platform"},
    }  # fmt: skip
    assert body["type"] == "kubernetes.io/tls"
    assert base64.b64decode(body["data"]["tls.key"]) == fresh.key_pem
    created = bootstrap.secret_body(BootstrapOptions(), fresh, fresh.ca_pem, None)
    assert "resourceVersion" not in created["metadata"]


# ------------------------------------------------------------- caBundle patch


def config_with(*bundles: str | None) -> dict[str, Any]:
    hooks = []
    for i, bundle in enumerate(bundles):
        client: dict[str, Any] = {"service": {"name": "ecr-webhook", "namespace": "ecr-webhook"}}
        if bundle is not None:
            client["caBundle"] = bundle
        hooks.append({"name": f"hook{i}.ecr-webhook.io", "clientConfig": client})
    return {"metadata": {"name": "ecr-webhook"}, "webhooks": hooks}


def test_ca_bundle_patch_sets_every_webhook_that_differs(fresh: certs.Bundle) -> None:
    want = b64(fresh.ca_pem)
    config = config_with(None, want, "c3RhbGU=")
    ops = bootstrap.ca_bundle_patch(config, fresh.ca_pem)
    assert [op["op"] for op in ops] == ["test", "add", "test", "add"]
    patched = jsonpatch.apply_patch(config, ops)
    assert [h["clientConfig"]["caBundle"] for h in patched["webhooks"]] == [want] * 3
    assert bootstrap.ca_bundle_patch(patched, fresh.ca_pem) == []  # idempotent


def test_ca_bundle_patch_fails_if_the_list_changed(fresh: certs.Bundle) -> None:
    config = config_with(None, None)
    ops = bootstrap.ca_bundle_patch(config, fresh.ca_pem)
    reordered = {"webhooks": list(reversed(config["webhooks"]))}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(reordered, ops)


def test_unreachable_apiserver_is_a_one_line_error(tmp_path: Any) -> None:
    """A real connection refused on loopback (port 1 has no listener), not a mock."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "webhook", "certs", "bootstrap", "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == bootstrap.BootstrapError.exit_code
    assert proc.stderr.startswith(
        "error: reading secret ecr-webhook/ecr-webhook-tls: cannot reach the apiserver: "
    )
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
