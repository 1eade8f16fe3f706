"""``ecr-webhook scan``: read image-pull failures from a cluster and explain them.

The shell: it lists Pods (container statuses waiting in ``ErrImagePull`` /
``ImagePullBackOff``), core/v1 Events with reasons ``Failed`` and
``FailedCreatePodSandBox``, Nodes (region and OS, when RBAC allows) and the
webhook's policy ConfigMap, turns them into ``diagnose.Observation``s and hands
them to the pure ``webhook.core.diagnose``.  Objects are read as plain JSON
(``_preload_content=False``), the form the planner takes.

Needs: get/list pods and events in the scanned namespaces; list nodes and get
the ConfigMap ``ecr-webhook/ecr-webhook-policy`` are optional (a note says what
was missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from yaml import YAMLError

from webhook.core import diagnose
from webhook.core.errors import ConfigError, EcrWebhookError, PolicyError
from webhook.core.policy import Policy, load_policy

POLICY_NAMESPACE = "ecr-webhook"
POLICY_CONFIGMAP = "ecr-webhook-policy"
POLICY_KEY = "policy.yaml"
PULL_WAITING_REASONS = ("ErrImagePull", "ImagePullBackOff")
EVENT_REASONS = ("Failed", "FailedCreatePodSandBox")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ScanError(EcrWebhookError):
    """The cluster could not be read."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class ScanOptions:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False
    output: str = "table"
    region: str | None = None
    policy_file: str | None = None
    page_size: int = 500  # list calls are paged (limit/continue) for large clusters


def run(opts: ScanOptions, out: IO[str]) -> int:
    """Scan and print the report; 0 whether or not there are findings (they are the output)."""
    report = scan(opts)
    if opts.output == "json":
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(diagnose.render_table(report))
    return 0


def scan(opts: ScanOptions) -> diagnose.Report:
    from kubernetes import client

    api, default_ns = _client(opts.kubeconfig, opts.context)
    with api:
        core = client.CoreV1Api(api)
        ns = None if opts.all_namespaces else (opts.namespace or default_ns)
        where = "all namespaces" if ns is None else f"namespace {ns}"
        notes: list[str] = []
        pages = opts.page_size
        pods = _list(core, "pod", ns, where, pages)  # first: an unreachable cluster fails here
        policy = _policy(core, opts.policy_file, notes)
        region = opts.region or policy.region
        events = [
            e
            for reason in EVENT_REASONS
            for e in _list(core, "event", ns, where, pages, field_selector=f"reason={reason}")
        ]
        nodes = _nodes(core, notes)
    by_key = {(p["metadata"].get("namespace", ""), p["metadata"].get("name", "")): p for p in pods}
    observations = list(_from_pods(pods)) + list(_from_events(events, by_key))
    return diagnose.build_report(
        observations,
        by_key,
        nodes,
        policy,
        region=region,
        scanned_pods=len(pods),
        notes=[f"scanned {where}", *notes],
    )


def _client(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient and the namespace kubectl would use by default."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    use_file = kubeconfig is not None or context is not None or _default_kubeconfig_exists()
    try:
        if use_file:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
            if context:
                contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
                active = next((c for c in contexts if c.get("name") == context), active)
            ns = ((active or {}).get("context") or {}).get("namespace") or "default"
            return api, str(ns)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        ns = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.is_file() else "default"
        return client.ApiClient(configuration), ns
    except (ConfigException, YAMLError, OSError, ValueError, TypeError, KeyError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "kubeconfig / in-cluster config"
        why = " ".join(str(exc).split())
        raise ConfigError(
            f"{where}: cannot load it: {why} (pass --kubeconfig FILE, or run in a pod)"
        ) from None


def _default_kubeconfig_exists() -> bool:
    env = os.environ.get("KUBECONFIG")
    if env:
        return any(Path(p).is_file() for p in env.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").is_file()


def _api_error(exc: Any, doing: str) -> ScanError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    detail = f"HTTP {status} {reason}" if status else " ".join(str(exc).split())[:300]
    hint = "; RBAC must allow get/list on pods and events" if status == 403 else ""
    return ScanError(f"{doing}: {detail}{hint}")


def _json(response: Any) -> dict[str, Any]:
    doc = json.loads(response.data)
    return doc if isinstance(doc, dict) else {}


def _list(
    core: Any,
    kind: str,
    ns: str | None,
    where: str,
    page_size: int,
    field_selector: str | None = None,
) -> list[dict[str, Any]]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    kwargs: dict[str, Any] = {"_preload_content": False, "limit": page_size}
    if field_selector:
        kwargs["field_selector"] = field_selector
    items: list[dict[str, Any]] = []
    try:
        while True:
            if ns is None:
                call = getattr(core, f"list_{kind}_for_all_namespaces")
                doc = _json(call(**kwargs))
            else:
                doc = _json(getattr(core, f"list_namespaced_{kind}")(ns, **kwargs))
            items.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
            token = (doc.get("metadata") or {}).get("continue")
            if not token:
                return items
            kwargs["_continue"] = token
    except (ApiException, HTTPError, OSError) as exc:
        raise _api_error(exc, f"listing {kind}s in {where}") from None


def _nodes(core: Any, notes: list[str]) -> dict[str, diagnose.NodeFacts]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        doc = _json(core.list_node(_preload_content=False))
    except ApiException as exc:
        notes.append(f"nodes not readable (HTTP {exc.status}): regions from node names only")
        return {}
    except (HTTPError, OSError) as exc:
        raise _api_error(exc, "listing nodes") from None
    nodes = {}
    for n in doc.get("items") or []:
        meta = n.get("metadata") or {}
        name = meta.get("name", "")
        info = (n.get("status") or {}).get("nodeInfo") or {}
        nodes[name] = diagnose.NodeFacts(
            name=name,
            region=diagnose.region_of_node(name, meta.get("labels")),
            os_image=str(info.get("osImage", "")),
            runtime=str(info.get("containerRuntimeVersion", "")),
        )
    return nodes


def _policy(core: Any, policy_file: str | None, notes: list[str]) -> Policy:
    """--policy FILE, else the webhook's ConfigMap, else the defaults (with a note)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if policy_file:
        try:
            text = Path(policy_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--policy {policy_file}: cannot read it: {exc.strerror}") from None
        return load_policy(text, policy_file)
    source = f"ConfigMap {POLICY_NAMESPACE}/{POLICY_CONFIGMAP}"
    try:
        cm = _json(
            core.read_namespaced_config_map(
                POLICY_CONFIGMAP, POLICY_NAMESPACE, _preload_content=False
            )
        )
    except ApiException as exc:
        notes.append(f"{source} not readable (HTTP {exc.status}): default policy used")
        return Policy()
    except (HTTPError, OSError) as exc:
        raise _api_error(exc, f"reading {source}") from None
    data = (cm.get("data") or {}).get(POLICY_KEY)
    if not data:
        return Policy(source=f"{source} (empty: defaults)")
    try:
        return load_policy(str(data), source)
    except PolicyError as exc:
        notes.append(f"{exc}: default policy used")
        return Policy()


def _spec_images(pod: Mapping[str, Any]) -> dict[str, str]:
    spec = pod.get("spec") or {}
    return {
        str(c.get("name")): str(c.get("image", ""))
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(kind) or []
        if isinstance(c, Mapping)
    }


def _from_pods(pods: list[dict[str, Any]]) -> Iterator[diagnose.Observation]:
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        images = _spec_images(pod)
        for kind in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(kind) or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") not in PULL_WAITING_REASONS:
                    continue
                name = str(cs.get("name", ""))
                yield diagnose.Observation(
                    namespace=str(meta.get("namespace", "")),
                    pod=str(meta.get("name", "")),
                    node=(pod.get("spec") or {}).get("nodeName"),
                    image=images.get(name) or str(cs.get("image", "")),
                    message=str(waiting.get("message", "")),
                    sandbox=False,
                    source="status",
                    reason=str(waiting["reason"]),
                    container=name,
                )


def _from_events(
    events: list[dict[str, Any]], pods: Mapping[tuple[str, str], Mapping[str, Any]]
) -> Iterator[diagnose.Observation]:
    for ev in events:
        obj = ev.get("involvedObject") or {}
        if obj.get("kind") != "Pod":
            continue
        reason = str(ev.get("reason", ""))
        message = str(ev.get("message", ""))
        ns, name = str(obj.get("namespace", "")), str(obj.get("name", ""))
        pod = pods.get((ns, name))
        sandbox = diagnose.is_sandbox_failure(reason, message)
        container = None
        field_path = str(obj.get("fieldPath", ""))
        if "{" in field_path:
            container = field_path.split("{", 1)[1].rstrip("}")
        if not sandbox and not message.startswith("Failed to pull image"):
            continue  # "Error: ErrImagePull" and the like carry no detail
        # The container's image in the pod spec is authoritative; the message's
        # is used for the sandbox image and for pods already gone.
        image = (None if sandbox else _spec_images(pod or {}).get(container or "")) or (
            diagnose.image_in_message(message)
        )
        if not image:
            continue
        node = ((pod or {}).get("spec") or {}).get("nodeName") or (ev.get("source") or {}).get(
            "host"
        )
        yield diagnose.Observation(
            namespace=ns,
            pod=name,
            node=node,
            image=image,
            message=message,
            sandbox=sandbox,
            source="event",
            reason=reason,
            container=container,
        )
