"""The kustomize tree in manifests/ and the rendered manifests/install.yaml.

Everything here looks at what kustomize (built from Go by
tools/build-kustomize.sh; never the kubectl on PATH, which may be a stand-in)
renders, not at the source files, so patches and components are included.
If kustomize cannot be built the tests FAIL with the build output.

One test per safety default of the issue, named after it.
"""

from __future__ import annotations

import copy
import csv
import itertools
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.manifests_support import (
    COMBINATIONS,
    INSTALL_YAML,
    MANIFESTS,
    KustomizeError,
    build_dir,
    build_with,
    documents,
    find,
    render_install,
)
from webhook import certs
from webhook.cli import cli
from webhook.config import ServeConfig
from webhook.core import ecr
from webhook.core.policy import load_policy

K8S_VERSION = "1.30.0"
NAMESPACE = "ecr-webhook"


@cache
def rendered(combination: str) -> tuple[dict[str, Any], ...]:
    try:
        return tuple(documents(build_with(COMBINATIONS[combination])))
    except KustomizeError as exc:  # a failure, never a skip
        pytest.fail(str(exc), pytrace=False)


@cache
def install() -> tuple[dict[str, Any], ...]:
    return tuple(documents(INSTALL_YAML.read_text()))


def deployment() -> dict[str, Any]:
    return find(install(), "Deployment", "ecr-webhook")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def server() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    assert isinstance(container, dict)
    return container


def webhook() -> dict[str, Any]:
    (hook,) = find(install(), "MutatingWebhookConfiguration", "ecr-webhook")["webhooks"]
    assert isinstance(hook, dict)
    return hook


def all_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for combination in COMBINATIONS:
        for doc in rendered(combination):
            yield combination, doc


# ------------------------------------------------------------------ rendering


def test_install_yaml_is_what_the_tree_renders() -> None:
    try:
        expected = render_install()
    except KustomizeError as exc:
        pytest.fail(str(exc), pytrace=False)
    assert INSTALL_YAML.read_text() == expected, (
        "manifests/install.yaml is stale: run tools/render-install.sh"
    )


def test_install_yaml_is_the_self_signed_overlay() -> None:
    overlay = documents(build_dir(MANIFESTS / "overlays" / "self-signed"))
    assert list(install()) == overlay == list(rendered("self-signed"))


def test_cert_manager_overlay_is_base_plus_component() -> None:
    overlay = documents(build_dir(MANIFESTS / "overlays" / "cert-manager"))
    assert overlay == list(rendered("cert-manager"))


# ------------------------------------------------------------------ validation

# Custom resources: their schemas come with their CRDs (cert-manager, Prometheus
# Operator), which kubernetes-validate does not ship; they are checked
# structurally here instead, against the fields those CRDs require.
CRD_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("cert-manager.io/v1", "Issuer"): ("spec.selfSigned",),
    ("cert-manager.io/v1", "Certificate"): (
        "spec.secretName",
        "spec.issuerRef.name",
        "spec.dnsNames",
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("spec.selector", "spec.endpoints"),
}


def _get(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"missing {dotted}"
        value = value[part]
    return value


def test_every_rendered_object_is_valid_for_kubernetes_1_30() -> None:
    checked = 0
    for combination, doc in all_objects():
        what = f"{combination}: {doc['kind']}/{doc['metadata']['name']}"
        crd = CRD_KINDS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, what
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), what
            assert doc["metadata"]["namespace"] == NAMESPACE, what
            for field in crd:
                assert _get(doc, field) is not None, what
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what}: {exc.message} at {list(exc.absolute_path)}", pytrace=False)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}", pytrace=False)
        checked += 1
    assert checked > 40  # four renderings of 13+ built-in objects each


def test_the_validator_rejects_what_it_should() -> None:
    """Control: strict 1.30 validation catches an unknown field and a wrong type."""
    bad = copy.deepcopy(deployment())
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(deployment())
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_custom_resource_kind_is_checked_structurally() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in all_objects()}
    assert kinds & set(CRD_KINDS) == set(CRD_KINDS)


def test_every_namespaced_object_is_in_the_webhook_namespace() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                      "MutatingWebhookConfiguration"}  # fmt: skip
    for combination, doc in all_objects():
        ns = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert ns is None, f"{combination}: {doc['kind']}"
        else:
            assert ns == NAMESPACE, f"{combination}: {doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------- Namespace, SA, minimal RBAC


def test_namespace_allows_host_network_pods() -> None:
    ns = find(install(), "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_server_service_account_has_no_api_access() -> None:
    """The server needs no API access: no binding names its ServiceAccount, no token."""
    sa = find(install(), "ServiceAccount", "ecr-webhook")
    assert sa["automountServiceAccountToken"] is False
    assert pod_spec()["serviceAccountName"] == "ecr-webhook"
    assert pod_spec()["automountServiceAccountToken"] is False
    for combination, doc in all_objects():
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            names = {s["name"] for s in doc["subjects"]}
            assert "ecr-webhook" not in names, combination


def test_bootstrap_rbac_is_limited_to_its_secret_and_its_webhook_configuration() -> None:
    docs = install()
    role = find(docs, "Role", "ecr-webhook-bootstrap")
    cluster_role = find(docs, "ClusterRole", "ecr-webhook-bootstrap")
    grants: list[tuple[str, str, str | None]] = []
    for rule in role["rules"] + cluster_role["rules"]:
        for resource in rule["resources"]:
            for verb in rule["verbs"]:
                names = rule.get("resourceNames") or [None]
                grants += [(resource, verb, n) for n in names]
    assert sorted(grants, key=str) == sorted([
        ("secrets", "get", "ecr-webhook-tls"),
        ("secrets", "update", "ecr-webhook-tls"),
        # create cannot be limited by name (the RBAC docs); the Role is namespaced.
        ("secrets", "create", None),
        ("mutatingwebhookconfigurations", "get", "ecr-webhook"),
        ("mutatingwebhookconfigurations", "patch", "ecr-webhook"),
    ], key=str)  # fmt: skip
    assert all("*" not in r.get("apiGroups", []) for r in role["rules"] + cluster_role["rules"])
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert {(b["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("RoleBinding", "ecr-webhook-bootstrap"),
        ("ClusterRoleBinding", "ecr-webhook-bootstrap"),
    }
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "ecr-webhook-bootstrap",
                                  "namespace": NAMESPACE}]  # fmt: skip


def test_cert_manager_path_has_no_rbac_at_all() -> None:
    kinds = {d["kind"] for d in rendered("cert-manager")}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "Job"}


# ----------------------------------------------------------------- Deployment


def test_deployment_has_at_least_two_replicas() -> None:
    assert deployment()["spec"]["replicas"] >= 2


def test_pod_disruption_budget_keeps_one_replica() -> None:
    pdb = find(install(), "PodDisruptionBudget", "ecr-webhook")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert deployment()["spec"]["replicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_pod_anti_affinity_spreads_replicas_over_nodes() -> None:
    anti = pod_spec()["affinity"]["podAntiAffinity"]
    (required,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert required["labelSelector"]["matchLabels"].items() <= labels.items()
    zones = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [z["podAffinityTerm"]["topologyKey"] for z in zones] == ["topology.kubernetes.io/zone"]


def test_priority_class_is_system_cluster_critical() -> None:
    assert pod_spec()["priorityClassName"] == "system-cluster-critical"


def test_tolerates_not_ready_and_unreachable_nodes() -> None:
    tolerations = pod_spec()["tolerations"]
    by_key = {t["key"]: t for t in tolerations}
    not_ready = by_key["node.kubernetes.io/not-ready"]
    # Both effects (NoSchedule and NoExecute), for good: a node with a broken
    # CNI is NotReady, and that is where the webhook is needed.
    assert not_ready == {"key": "node.kubernetes.io/not-ready", "operator": "Exists"}
    unreachable = by_key["node.kubernetes.io/unreachable"]
    assert unreachable["operator"] == "Exists" and unreachable["effect"] == "NoExecute"
    assert 0 < unreachable["tolerationSeconds"] <= 300


def test_readiness_and_liveness_probes_use_https() -> None:
    c = server()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert (get["scheme"], get["path"], get["port"]) == ("HTTPS", path, "https"), probe
    # A probe must give up before the kubelet's next one.
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["timeoutSeconds"] < c[probe]["periodSeconds"]


def test_security_context_non_root() -> None:
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    assert server()["securityContext"]["runAsNonRoot"] is True
    assert server()["securityContext"]["runAsUser"] > 0
    assert server()["securityContext"]["allowPrivilegeEscalation"] is False


def test_security_context_read_only_root_filesystem() -> None:
    assert server()["securityContext"]["readOnlyRootFilesystem"] is True


def test_security_context_drops_all_capabilities() -> None:
    caps = server()["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"]}


def test_security_context_seccomp_runtime_default() -> None:
    assert pod_spec()["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert server()["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_resources_have_requests_and_limits() -> None:
    resources = server()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind


def test_host_network_does_not_depend_on_the_cni() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    # CoreDNS sits behind the CNI; the node's resolver does not.
    assert spec["dnsPolicy"] == "Default"
    for port in server()["ports"]:
        # Host ports above the NodePort range and Linux's ephemeral range.
        assert port["hostPort"] == port["containerPort"]
        assert 61000 <= port["containerPort"] <= 65535


def test_server_args_are_flags_of_the_serve_command() -> None:
    args = server()["args"]
    assert args[0] == "serve"
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Command)
    known = {opt for p in serve.params for opt in getattr(p, "opts", [])}
    flags = dict(a.split("=", 1) for a in args[1:])
    assert set(flags) <= known, set(flags) - known
    # Parsing them with the real command gives the intended configuration.
    ctx = serve.make_context("serve", list(args[1:]))
    assert ctx.params["port"] == 61443 and ctx.params["metrics_port"] == 61444
    assert ctx.params["audit_log"] == "-"
    ports = {p["name"]: p["containerPort"] for p in server()["ports"]}
    assert ports == {"https": ctx.params["port"], "metrics": ctx.params["metrics_port"]}
    assert flags["--cert-file"] == "/etc/ecr-webhook/tls/tls.crt"
    assert flags["--key-file"] == "/etc/ecr-webhook/tls/tls.key"
    assert flags["--policy"] == "/etc/ecr-webhook/policy/policy.yaml"


def test_secret_and_policy_are_mounted_without_sub_path() -> None:
    """A subPath mount never sees a rotated Secret or an edited ConfigMap."""
    for combination, doc in all_objects():
        text = repr(doc)
        assert "subPath" not in text, f"{combination}: {doc['kind']}"
    mounts = {m["name"]: m for m in server()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert mounts["tls"]["mountPath"] == "/etc/ecr-webhook/tls"
    assert volumes["tls"]["secret"]["secretName"] == "ecr-webhook-tls"
    assert mounts["policy"]["mountPath"] == "/etc/ecr-webhook/policy"
    assert volumes["policy"]["configMap"]["name"] == "ecr-webhook-policy"


def test_image_is_the_placeholder_and_can_be_overridden() -> None:
    assert server()["image"] == "ecr-webhook:0.1.0"
    extra = ("images:\n  - name: ecr-webhook\n"
             "    newName: registry.example.com/team/ecr-webhook\n    newTag: 1.2.3\n")  # fmt: skip
    docs = documents(build_with(("self-signed",), extra))
    images = set()
    for doc in docs:
        text = repr(doc)
        images |= set(re.findall(r"'image': '([^']+)'", text))
    assert images == {"registry.example.com/team/ecr-webhook:1.2.3"}


# -------------------------------------------------------------- Service, policy


def test_service_routes_to_the_named_container_ports() -> None:
    svc = find(install(), "Service", "ecr-webhook")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in server()["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    https = next(p for p in svc["spec"]["ports"] if p["name"] == "https")
    assert webhook()["clientConfig"]["service"] == {
        "namespace": NAMESPACE,
        "name": "ecr-webhook",
        "path": "/mutate",
        "port": https["port"],
    }


def test_policy_config_map_holds_a_valid_policy() -> None:
    cm = find(install(), "ConfigMap", "ecr-webhook-policy")
    assert set(cm["data"]) == {"policy.yaml"}
    policy = load_policy(cm["data"]["policy.yaml"], "ConfigMap ecr-webhook-policy")
    assert NAMESPACE in policy.exclude_namespaces
    assert policy.opt_out_label == webhook()["objectSelector"]["matchExpressions"][0]["key"]


# ------------------------------------------------- MutatingWebhookConfiguration


def test_webhook_admission_review_versions() -> None:
    assert webhook()["admissionReviewVersions"] == ["v1", "v1beta1"]


def test_webhook_side_effects_none() -> None:
    assert webhook()["sideEffects"] == "None"


def test_webhook_fails_open() -> None:
    assert webhook()["failurePolicy"] == "Ignore"


def test_webhook_timeout_above_probe_budget_and_at_most_ten() -> None:
    timeout = webhook()["timeoutSeconds"]
    assert ServeConfig().probe_budget_seconds < timeout <= 10


def test_webhook_reinvocation_if_needed() -> None:
    assert webhook()["reinvocationPolicy"] == "IfNeeded"


def test_webhook_rules_pods_create_and_ephemeral_containers_update() -> None:
    rules = {(tuple(r["operations"]), tuple(r["resources"])) for r in webhook()["rules"]}
    assert rules == {(("CREATE",), ("pods",)), (("UPDATE",), ("pods/ephemeralcontainers",))}
    for r in webhook()["rules"]:
        assert (r["apiGroups"], r["apiVersions"], r["scope"]) == ([""], ["v1"], "Namespaced")


def test_webhook_never_called_for_its_own_namespace() -> None:
    assert webhook()["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE]}
    ]}  # fmt: skip


def test_webhook_object_selector_opt_out_label() -> None:
    assert webhook()["objectSelector"] == {"matchExpressions": [
        {"key": "ecr-webhook.io/skip", "operator": "NotIn", "values": ["true"]}
    ]}  # fmt: skip


def test_webhook_ca_bundle_is_left_to_the_certificate_source() -> None:
    """Absent from the manifest, so re-applying it never wipes an injected caBundle."""
    for combination in COMBINATIONS:
        hook = find(rendered(combination), "MutatingWebhookConfiguration")["webhooks"][0]
        assert "caBundle" not in hook["clientConfig"], combination


# CEL: the shape of the expression, then its regular expression against every
# registry host the planner knows.  (The real apiserver compiles and evaluates
# it in tests/e2e/test_install.py.)


def match_expression() -> str:
    (condition,) = webhook()["matchConditions"]
    assert condition["name"] == "has-ecr-image"
    expr = condition["expression"]
    assert isinstance(expr, str)
    return expr


def cel_regex() -> re.Pattern[str]:
    (pattern,) = re.findall(r"\.matches\(\s*'([^']*)'\s*\)", match_expression())
    # RE2's (?i) and these constructs mean the same in Python's re.
    return re.compile(pattern)


def test_match_condition_covers_all_container_kinds_and_guards_absent_fields() -> None:
    expr = match_expression()
    assert expr.startswith("has(object.spec) &&")
    for kind in ("containers", "initContainers", "ephemeralContainers"):
        assert f"has(object.spec.{kind}) ? object.spec.{kind} : []" in expr, kind
    assert "has(c.image) && c.image.matches(" in expr


def _registry_hosts() -> set[str]:
    data = Path(ecr.__file__).parent.parent / "data"
    hosts: set[str] = set()
    with (data / "ecr_accounts.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        region, account = row["region"], row["account"]
        suffix = ecr.partition_of_region(region)
        assert suffix is not None
        hosts.add(f"{account}.dkr.ecr.{region}.{suffix.dns_suffix}")
        hosts.add(f"{account}.dkr.ecr-fips.{region}.{suffix.dns_suffix}")
        if suffix.dualstack_suffix:
            hosts.add(f"{account}.dkr-ecr.{region}.{suffix.dualstack_suffix}")
            hosts.add(f"{account}.dkr-ecr-fips.{region}.{suffix.dualstack_suffix}")
    with (data / "ecr_registry_host_variants.csv").open() as f:
        hosts |= {row["registry_host"] for row in csv.DictReader(f)}
    # Every partition's suffix, including those without an EKS account listed.
    for p in ecr.PARTITIONS:
        hosts.add(f"111122223333.dkr.ecr.xx-test-1.{p.dns_suffix}")
    return hosts


def test_match_condition_sends_every_ecr_registry_host() -> None:
    regex = cel_regex()
    hosts = _registry_hosts()
    assert len(hosts) > 100
    for host in sorted(hosts):
        for image in (f"{host}/eks/pause:3.9", f"{host}:443/amazon-k8s-cni:v1.19.0",
                      f"{host.upper()}/eks/coredns@sha256:{'a' * 64}"):  # fmt: skip
            assert regex.search(image), image
        assert ecr.looks_like_ecr(host), host  # the planner's own pre-filter agrees


@pytest.mark.parametrize("image", [
    "nginx",
    "docker.io/library/nginx:1.27",
    "public.ecr.aws/eks/aws-load-balancer-controller:v2.8.0",
    "registry.k8s.io/pause:3.9",
    "quay.io/602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.9",
    "example.com/602401143452.dkr.ecr.us-west-2.amazonaws.com:3.9",
    "602401143452.dkr.ecr.us-west-2.amazonaws.com.evil.example/eks/pause:3.9",
    "602401143452.dkr.ecr.us-west-2.amazonaws.com",  # no repository: not an ECR image
])  # fmt: skip
def test_match_condition_leaves_other_images_alone(image: str) -> None:
    assert not cel_regex().search(image)


# ----------------------------------------------------------- self-signed path


def test_bootstrap_job_and_cronjob_run_the_same_pod() -> None:
    job = find(install(), "Job", "ecr-webhook-bootstrap")["spec"]["template"]
    cron_job = find(install(), "CronJob", "ecr-webhook-renew")
    cron = cron_job["spec"]["jobTemplate"]["spec"]["template"]
    assert job == cron


def test_bootstrap_args_are_flags_of_certs_bootstrap() -> None:
    job = find(install(), "Job", "ecr-webhook-bootstrap")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    args = container["args"]
    assert args[:2] == ["certs", "bootstrap"]
    group = cli.commands["certs"]
    assert isinstance(group, click.Group)
    command = group.commands["bootstrap"]
    ctx = command.make_context("bootstrap", list(args[2:]))
    assert ctx.params == {
        "namespace": NAMESPACE, "service": "ecr-webhook", "secret": "ecr-webhook-tls",
        "webhook_name": "ecr-webhook", "renew_before": "720h", "days": 365, "kubeconfig": None,
    }  # fmt: skip
    assert job["serviceAccountName"] == "ecr-webhook-bootstrap"
    # Same placement and hardening as the server.
    assert job["hostNetwork"] is True and job["dnsPolicy"] == "Default"
    assert job["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert job["tolerations"] == pod_spec()["tolerations"]


def test_finished_bootstrap_jobs_are_cleaned_up() -> None:
    """A Job's template is immutable: a leftover Job would break the next apply."""
    job = find(install(), "Job", "ecr-webhook-bootstrap")
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 86400


# ------------------------------------------------------------ cert-manager path


def test_cert_manager_certificate_and_ca_injection() -> None:
    docs = rendered("cert-manager")
    cert = find(docs, "Certificate", "ecr-webhook")
    issuer = find(docs, "Issuer")
    assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert cert["spec"]["secretName"] == "ecr-webhook-tls"
    assert cert["spec"]["dnsNames"] == certs.service_names("ecr-webhook", NAMESPACE)
    mwc = find(docs, "MutatingWebhookConfiguration", "ecr-webhook")
    annotation = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{NAMESPACE}/{cert['metadata']['name']}"
    assert "cert-manager.io/inject-ca-from" not in repr(install())


# --------------------------------------------------------- monitoring and HPA


def test_service_monitor_scrapes_the_metrics_port() -> None:
    docs = rendered("self-signed+monitoring+hpa")
    monitor = find(docs, "ServiceMonitor", "ecr-webhook")
    svc = find(docs, "Service", "ecr-webhook")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["port"] == "metrics"


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar() -> None:
    cm = find(rendered("self-signed+monitoring+hpa"), "ConfigMap", "ecr-webhook-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(cm["data"]) == {"ecr-webhook.json"}


def test_hpa_owns_the_replica_count_and_keeps_two() -> None:
    docs = rendered("self-signed+monitoring+hpa")
    hpa = find(docs, "HorizontalPodAutoscaler", "ecr-webhook")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "ecr-webhook"}  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in find(docs, "Deployment", "ecr-webhook")["spec"]


# ------------------------------------------------------------------ the docs


DEPLOY_MD = MANIFESTS.parent / "README.md"


def test_documented_kubectl_commands_use_files_that_exist() -> None:
    # A command continued with a backslash is one command.
    text = re.sub(r"\\\n\s*", " ", DEPLOY_MD.read_text())
    commands = re.findall(r"^\s*(kubectl [^\n]+)$", text, flags=re.M)
    assert len(commands) >= 6
    for command in commands:
        words = shlex.split(command)
        for flag, value in itertools.pairwise(words):
            if flag in ("-f", "-k") and value != "-":
                assert (MANIFESTS.parent / value).exists(), command


@pytest.mark.parametrize("section", ["### Self-signed certificates", "### cert-manager"])
def test_each_certificate_path_installs_in_at_most_three_commands(section: str) -> None:
    text = DEPLOY_MD.read_text()
    after = text[text.index(section) :]
    block = re.search(r"```sh\n(.*?)```", after, flags=re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert 1 <= len(commands) <= 3
    assert commands[0].startswith("kubectl apply ")
