"""``ecr-webhook certs bootstrap`` against a real kube-apiserver (tests/e2e/controlplane.py).

manifests/install.yaml is applied for real (server-side apply with the kubectl
built next to the apiserver); nothing runs its Deployment or Job, as the
control plane has no controller-manager or kubelet, so the tests run the
command themselves, as a subprocess, the way the Job would.

State is shared with the other e2e tests (one control plane per session), so
every test first puts the Secret and the caBundle in the state it needs, and the
module removes its cluster-scoped objects at the end.  The namespace stays:
without kube-controller-manager a deleted namespace would hang in Terminating.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.controlplane import ControlPlane
from webhook import bootstrap, certs

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INSTALL_YAML = ROOT / "manifests" / "install.yaml"
NS, SECRET, WEBHOOK, SA = "ecr-webhook", "ecr-webhook-tls", "ecr-webhook", "ecr-webhook-bootstrap"
NAMES = certs.service_names("ecr-webhook", NS)


# ------------------------------------------------------------------ helpers


def api_client(kubeconfig: Path) -> client.ApiClient:
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    assert isinstance(api, client.ApiClient)
    return api


def kubectl(cp: ControlPlane, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        cp.kubectl(*args), input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)}:\n{proc.stderr}"
    return proc.stdout


def raw(response: Any) -> dict[str, Any]:
    doc = json.loads(response.data)
    assert isinstance(doc, dict)
    return doc


class Cluster:
    """The objects the bootstrap touches, read and reset as admin."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.api = api_client(cp.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.admission = client.AdmissionregistrationV1Api(self.api)

    def secret(self, name: str = SECRET) -> dict[str, Any] | None:
        try:
            return raw(self.core.read_namespaced_secret(name, NS, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret_data(self) -> dict[str, bytes]:
        secret = self.secret()
        assert secret is not None
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def webhook_config(self) -> dict[str, Any]:
        return raw(self.admission.read_mutating_webhook_configuration(
            WEBHOOK, _preload_content=False))  # fmt: skip

    def ca_bundles(self) -> list[bytes]:
        hooks = self.webhook_config()["webhooks"]
        return [base64.b64decode(h["clientConfig"].get("caBundle", "")) for h in hooks]

    def delete_secret(self, name: str = SECRET) -> None:
        try:
            self.core.delete_namespaced_secret(name, NS, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def put_secret(self, bundle: certs.Bundle, ca_pem: bytes | None = None) -> None:
        """Replace the Secret with ``bundle`` and point the caBundle at its CA."""
        self.delete_secret()
        opts = bootstrap.BootstrapOptions()
        body = bootstrap.secret_body(opts, bundle, ca_pem or bundle.ca_pem, None)
        self.core.create_namespaced_secret(
            NS, client.V1Secret.model_validate(body), _preload_content=False)  # fmt: skip
        self.set_ca_bundle(ca_pem or bundle.ca_pem)

    def set_ca_bundle(self, ca_pem: bytes) -> None:
        ops = bootstrap.ca_bundle_patch(self.webhook_config(), ca_pem)
        if ops:
            self.admission.patch_mutating_webhook_configuration(
                WEBHOOK, ops, _content_type="application/json-patch+json",
                _preload_content=False)  # fmt: skip

    def reset(self) -> None:
        """No Secret, no caBundle: the state right after `kubectl apply -f install.yaml`."""
        self.delete_secret()
        hooks = self.webhook_config()["webhooks"]
        ops = [{"op": "remove", "path": f"/webhooks/{i}/clientConfig/caBundle"}
               for i, h in enumerate(hooks) if "caBundle" in h["clientConfig"]]  # fmt: skip
        if ops:
            self.admission.patch_mutating_webhook_configuration(
                WEBHOOK, ops, _content_type="application/json-patch+json",
                _preload_content=False)  # fmt: skip


def run_bootstrap(kubeconfig: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The CLI, as the Job runs it (plus --kubeconfig: we are not in a pod)."""
    return subprocess.run(
        [sys.executable, "-m", "webhook", "certs", "bootstrap", "--kubeconfig", str(kubeconfig),
         *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Iterator[Cluster]:
    kubectl(control_plane, "apply", "--server-side", "--field-manager=e2e-install",
            "-f", str(INSTALL_YAML))  # fmt: skip
    c = Cluster(control_plane)
    yield c
    c.delete_secret()
    c.delete_secret("not-tls")
    for kind in ("mutatingwebhookconfiguration", "clusterrolebinding", "clusterrole"):
        name = WEBHOOK if kind.startswith("mutating") else SA
        kubectl(control_plane, "delete", kind, name, "--ignore-not-found")
    c.api.close()  # type: ignore[no-untyped-call]


def assert_consistent(c: Cluster) -> dict[str, bytes]:
    """The Secret serves the Service's names and every caBundle is its ca.crt."""
    data = c.secret_data()
    assert c.secret()["type"] == "kubernetes.io/tls"  # type: ignore[index]
    dns, _ = certs.sans_of(data["tls.crt"])
    assert set(NAMES) <= set(dns)
    verdict = bootstrap.assess_secret(c.secret(), NAMES, dt.timedelta(hours=720),
                                      dt.datetime.now(dt.UTC))  # fmt: skip
    assert not verdict.renew, verdict.reason  # key pair, CA signature, expiry all fine
    assert c.ca_bundles() == [data["ca.crt"]]
    return data


# -------------------------------------------------------------------- tests


def test_first_run_creates_the_secret_and_patches_the_ca_bundle(cluster: Cluster) -> None:
    cluster.reset()
    lines = ok(run_bootstrap(cluster.cp.kubeconfig))
    assert lines[0].startswith(f"secret {NS}/{SECRET}: created; valid until ")
    assert lines[1] == (f"mutatingwebhookconfiguration {WEBHOOK}: "
                        "caBundle patched in 1 of 1 webhook(s)")  # fmt: skip
    assert lines[-1] == "2 change(s) made"
    data = assert_consistent(cluster)
    expiry = certs.not_after(data["tls.crt"])
    assert dt.timedelta(days=364) < expiry - dt.datetime.now(dt.UTC) <= dt.timedelta(days=365)


def test_second_run_changes_nothing(cluster: Cluster) -> None:
    ok(run_bootstrap(cluster.cp.kubeconfig))  # whatever the state, converge first
    before = (cluster.secret()["metadata"]["resourceVersion"],  # type: ignore[index]
              cluster.webhook_config()["metadata"]["resourceVersion"])  # fmt: skip
    lines = ok(run_bootstrap(cluster.cp.kubeconfig))
    assert lines[-1] == "no changes"
    assert lines[0].startswith(f"secret {NS}/{SECRET}: unchanged (valid until ")
    assert "caBundle unchanged" in lines[1]
    after = (cluster.secret()["metadata"]["resourceVersion"],  # type: ignore[index]
             cluster.webhook_config()["metadata"]["resourceVersion"])  # fmt: skip
    assert after == before


def test_renews_a_certificate_within_renew_before(cluster: Cluster) -> None:
    """A certificate with 10 days left (as if issued 355 days ago) is renewed."""
    old = certs.build_certificate(NAMES, days=10)
    cluster.put_secret(old)
    rv = cluster.secret()["metadata"]["resourceVersion"]  # type: ignore[index]
    lines = ok(run_bootstrap(cluster.cp.kubeconfig))
    assert lines[0].startswith(f"secret {NS}/{SECRET}: renewed (")
    assert "within 720h" in lines[0]
    assert cluster.secret()["metadata"]["resourceVersion"] != rv  # type: ignore[index]
    data = assert_consistent(cluster)
    assert certs.not_after(data["tls.crt"]) > old.not_after + dt.timedelta(days=300)
    # Rotation without a gap: the old CA stays trusted next to the new one.
    cas = x509.load_pem_x509_certificates(data["ca.crt"])
    assert len(cas) == 2
    assert cas[1] == x509.load_pem_x509_certificate(old.ca_pem)
    assert ok(run_bootstrap(cluster.cp.kubeconfig))[-1] == "no changes"


def test_renews_when_sans_do_not_cover_the_service(cluster: Cluster) -> None:
    cluster.put_secret(certs.build_certificate(certs.service_names("old-name", NS), days=365))
    lines = ok(run_bootstrap(cluster.cp.kubeconfig))
    assert lines[0].startswith(f"secret {NS}/{SECRET}: renewed (")
    assert "do not cover" in lines[0]
    assert_consistent(cluster)


def test_patches_a_stale_ca_bundle_without_touching_the_secret(cluster: Cluster) -> None:
    ok(run_bootstrap(cluster.cp.kubeconfig))
    rv = cluster.secret()["metadata"]["resourceVersion"]  # type: ignore[index]
    cluster.set_ca_bundle(certs.build_certificate(["elsewhere"], days=1).ca_pem)
    lines = ok(run_bootstrap(cluster.cp.kubeconfig))
    assert lines[0].startswith(f"secret {NS}/{SECRET}: unchanged")
    assert "caBundle patched" in lines[1] and lines[-1] == "1 change(s) made"
    assert cluster.secret()["metadata"]["resourceVersion"] == rv  # type: ignore[index]
    assert_consistent(cluster)


def _service_account_kubeconfig(cluster: Cluster, path: Path) -> Path:
    """A kubeconfig holding a short-lived token of the bootstrap's ServiceAccount."""
    request = client.AuthenticationV1TokenRequest.model_validate(
        {"spec": {"audiences": [], "expirationSeconds": 600}})  # fmt: skip
    token = raw(cluster.core.create_namespaced_service_account_token(
        SA, NS, request, _preload_content=False))["status"]["token"]  # fmt: skip
    ca = base64.b64encode(cluster.cp.ca_file.read_bytes()).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster.cp.server,
                                                 "certificate-authority-data": ca}}],
        "users": [{"name": SA, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "e2e", "user": SA, "namespace": NS}}],
    }))  # fmt: skip
    return path


def test_runs_with_only_its_own_rbac(cluster: Cluster, tmp_path: Path) -> None:
    """The Job's ServiceAccount, bound by install.yaml's RBAC, is enough, and no more."""
    kubeconfig = _service_account_kubeconfig(cluster, tmp_path / "sa.kubeconfig")
    cluster.reset()
    lines = ok(run_bootstrap(kubeconfig))
    assert lines[-1] == "2 change(s) made"  # create, then patch
    assert_consistent(cluster)
    cluster.put_secret(certs.build_certificate(NAMES, days=10))
    assert "renewed" in ok(run_bootstrap(kubeconfig))[0]  # update
    assert ok(run_bootstrap(kubeconfig))[-1] == "no changes"

    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        cluster.delete_secret("not-tls")
        cluster.core.create_namespaced_secret(
            NS,
            client.V1Secret.model_validate(
                {"metadata": {"name": "not-tls"}, "stringData": {"k": "v"}}
            ),
            _preload_content=False,
        )
        with pytest.raises(ApiException) as denied:
            core.read_namespaced_secret("not-tls", NS, _preload_content=False)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(NS, _preload_content=False)
        assert denied.value.status == 403
    # Another secret name through the CLI: refused, with the RBAC hint, one line.
    proc = run_bootstrap(kubeconfig, "--secret", "not-tls")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: reading secret {NS}/not-tls: HTTP 403 Forbidden")
    assert "RBAC" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_webhook_configuration_is_a_one_line_error(cluster: Cluster) -> None:
    proc = run_bootstrap(cluster.cp.kubeconfig, "--webhook", "no-such-config")
    assert proc.returncode == 1
    assert proc.stderr == ("error: mutatingwebhookconfiguration no-such-config does not exist: "
                           "apply the manifests first (kubectl apply -f manifests/install.yaml), "
                           "then run again\n")  # fmt: skip


def test_secret_of_another_type_is_a_one_line_error(cluster: Cluster) -> None:
    cluster.delete_secret("not-tls")
    cluster.core.create_namespaced_secret(
        NS,
        client.V1Secret.model_validate({"metadata": {"name": "not-tls"}, "stringData": {"k": "v"}}),
        _preload_content=False,
    )
    proc = run_bootstrap(cluster.cp.kubeconfig, "--secret", "not-tls")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"error: secret {NS}/not-tls has type 'Opaque', not 'kubernetes.io/tls'"
    )
    assert "delete it" in proc.stderr and "Traceback" not in proc.stderr
    assert cluster.secret("not-tls")["type"] == "Opaque"  # type: ignore[index]  # untouched
