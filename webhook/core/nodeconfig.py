"""Node-level settings for the sandbox (pause) image.  Pure rendering.

The sandbox image is node configuration: containerd pulls it itself when it
creates a pod sandbox, without the kubelet's ECR credential provider, and it
appears in no pod spec, so no admission webhook can rewrite it.  This module
renders, per node OS, the setting that points it at the registry that serves
the node's region (account and partition from the same package data as the
planner, ``webhook.core.ecr.default_facts()``) or at a mirror.

Per OS (sources in the comments next to each renderer):

* ``bottlerocket``: user-data TOML ``[settings.kubernetes] pod-infra-container-image``.
  Bottlerocket 1.21.0 and later ship the pause image inside the OS and ignore it.
* ``al2``: ``/etc/eks/bootstrap.sh --pause-container-account/--pause-container-version``.
* ``al2023``: a nodeadm ``NodeConfig`` whose ``spec.containerd.config`` carries the
  containerd setting.
* ``containerd``: the containerd config for 1.x (``sandbox_image``) and for 2.x
  (``pinned_images``).

``render`` checks its own output (``check``): every TOML document parses with
``tomllib`` and names the image, the NodeConfig is YAML with the right
apiVersion and kind, and the shell line splits into the flags it promises.
"""

from __future__ import annotations

import re
import shlex
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import yaml

from webhook.core import ecr
from webhook.core.errors import ConfigError
from webhook.core.imageref import try_parse

SCHEMA_VERSION = "v1"
PAUSE_REPOSITORY = "eks/pause"

# Default tags, per OS, of the ECR eks/pause image, following what the images ship:
# - Bottlerocket, up to 1.20.x, generated
#   `{{ pause-prefix settings.aws.region }}/eks/pause:3.1-eksbuild.1`
#   (../shared/corpus/bottlerocket/
#   bottlerocket-v1.20.0__sources__models__shared-defaults__kubernetes-aws.toml);
#   from 1.21.0 it ships its own localhost/kubernetes/pause:0.1.0
#   (../shared/corpus/bottlerocket/core-kit-HEAD__packages__kubernetes-1.29__pause-manifest.json).
# - The EKS AMIs pull eks/pause:3.5: AL2 bootstrap.sh `PAUSE_CONTAINER_VERSION:-3.5` and
#   templates/al2/provisioners/cache-pause-container.sh (awslabs/amazon-eks-ami), the FIPS
#   example `.../eks/pause:3.5` (../shared/corpus/images_inventory.tsv, row
#   eks-ami/HEAD__doc__usage__al2.md),
#   and nodeadm's default SandboxImage `<ecr>/eks/pause:3.5`.  Current AL2023 AMIs cache
#   public.ecr.aws/eks-distro/kubernetes/pause:3.10 as localhost/kubernetes/pause
#   (images_inventory.tsv, eks-ami/HEAD__templates__al2023__variables-default.json).
DEFAULT_PAUSE_TAGS: dict[str, str] = {
    "bottlerocket": "3.1-eksbuild.1",
    "al2": "3.5",
    "al2023": "3.5",
    "containerd": "3.5",
}

NODEADM_API_VERSION = "node.eks.aws/v1alpha1"
NODEADM_KIND = "NodeConfig"

_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_REGISTRY = re.compile(r"^[a-zA-Z0-9.-]+(?::[0-9]+)?$")
_PREFIX = re.compile(
    r"^[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*)*$"
)


class NodeOS(StrEnum):
    BOTTLEROCKET = "bottlerocket"
    AL2 = "al2"
    AL2023 = "al2023"
    CONTAINERD = "containerd"


@dataclass(frozen=True, slots=True)
class Document:
    """One rendered configuration document.

    ``format`` is ``toml``, ``yaml`` or ``shell``; ``text`` starts with ``#``
    comments, valid in all three, so the whole text is what the user pastes.
    """

    title: str
    format: str
    applies_to: str
    text: str


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The rendered setting for one OS and region, with what it was built from."""

    os: NodeOS
    region: str
    partition: str | None
    account: str | None
    registry: str
    image: str
    pause_tag: str
    mirror: str | None
    documents: tuple[Document, ...]
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The ``--output json`` report (``schemaVersion`` v1)."""
        return {
            "schemaVersion": SCHEMA_VERSION,
            "os": str(self.os),
            "region": self.region,
            "partition": self.partition,
            "account": self.account,
            "registry": self.registry,
            "image": self.image,
            "pauseTag": self.pause_tag,
            "mirror": self.mirror,
            "notes": list(self.notes),
            "documents": [
                {"title": d.title, "format": d.format, "appliesTo": d.applies_to, "text": d.text}
                for d in self.documents
            ],
        }

    def to_text(self) -> str:
        """All documents, each preceded by its title as a comment line."""
        parts = []
        for d in self.documents:
            parts.append(f"# ---- {d.title} ----\n{d.text}")
        return "\n".join(parts)


def render(
    os_name: str,
    region: str,
    *,
    pause_tag: str | None = None,
    mirror: str | None = None,
    facts: ecr.EcrFacts | None = None,
) -> NodeConfig:
    """Render and self-check the sandbox-image setting for ``os_name`` in ``region``.

    Raises ``ConfigError`` (exit code 2) naming the bad value: an unknown OS, a
    region the registry data does not know (unless ``mirror`` names the
    registry), a bad tag or a bad mirror.
    """
    try:
        node_os = NodeOS(os_name)
    except ValueError:
        raise ConfigError(
            f"--os: unknown node OS {os_name!r}; use one of {', '.join(o.value for o in NodeOS)}"
        ) from None
    facts = facts or ecr.default_facts()
    tag = pause_tag or DEFAULT_PAUSE_TAGS[node_os.value]
    if not _TAG.match(tag):
        raise ConfigError(
            f"--pause-tag: {tag!r} is not an image tag (letters, digits, '_', '.', '-'; "
            "at most 128 characters), e.g. 3.5"
        )
    region_facts = facts.regions.get(region)
    partition = facts.partition_of(region)
    if mirror is not None:
        registry, repo_path = _mirror(mirror)
        host = ecr.parse_host(registry.split(":")[0])
        account = host.account if host else None
        if host is not None and host.partition:
            partition = host.partition
    else:
        if region_facts is None:
            raise ConfigError(
                f"--region: no EKS registry is known for region {region!r} in the package data "
                f"(webhook/data/ecr_accounts.csv, version {ecr.DATA_VERSION}); check the region "
                "name (e.g. eu-central-1), or name a registry that holds eks/pause with "
                "--mirror REGISTRY[/PREFIX]"
            )
        registry = region_facts.registry_host
        repo_path = PAUSE_REPOSITORY
        account = region_facts.account
        partition = region_facts.partition
    image = f"{registry}/{repo_path}:{tag}"
    if try_parse(image) is None:
        raise ConfigError(f"--mirror: {mirror!r} does not give a valid image reference ({image})")
    cfg = NodeConfig(
        os=node_os,
        region=region,
        partition=partition,
        account=account,
        registry=registry,
        image=image,
        pause_tag=tag,
        mirror=mirror,
        documents=(),
    )
    docs, notes = _RENDERERS[node_os](cfg, region_facts)
    cfg = NodeConfig(**{**_fields(cfg), "documents": docs, "notes": notes})
    check(cfg)
    return cfg


def _fields(cfg: NodeConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in NodeConfig.__slots__}


def _mirror(mirror: str) -> tuple[str, str]:
    registry, _, prefix = mirror.strip().partition("/")
    prefix = prefix.strip("/")
    if not _REGISTRY.match(registry) or ("." not in registry and ":" not in registry):
        raise ConfigError(
            f"--mirror: {mirror!r}: the registry must be a host name with a dot or a port "
            "(e.g. 111122223333.dkr.ecr.eu-central-1.amazonaws.com/eks-mirror)"
        )
    if prefix and not _PREFIX.match(prefix):
        raise ConfigError(
            f"--mirror: {mirror!r}: the prefix {prefix!r} is not a repository path "
            "(lower-case components separated by '/')"
        )
    return registry, f"{prefix}/{PAUSE_REPOSITORY}" if prefix else PAUSE_REPOSITORY


def _wrap(first: str, text: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=88,
        initial_indent=first,
        subsequent_indent="#   ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def _header(
    cfg: NodeConfig, applies_to: str, notes: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> str:
    source = (
        f"mirror {cfg.mirror}"
        if cfg.mirror
        else f"EKS account {cfg.account} ({cfg.partition}) for {cfg.region}"
    )
    lines = [
        *_wrap("# ", f"Sandbox (pause) image for {cfg.os.value} nodes in {cfg.region}: {source}."),
        *_wrap("# Applies to: ", applies_to),
        *(ln for n in notes for ln in _wrap("# Note: ", n)),
        *extra,
        "# The webhook cannot rewrite this image: containerd pulls it for every pod",
        "# sandbox and it is in no pod spec (node configuration; `ecr-webhook node-config`).",
    ]
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    # A TOML basic string; image references hold no quotes or backslashes
    # (distribution/reference grammar), escaped anyway.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


Rendered = tuple[tuple[Document, ...], tuple[str, ...]]
Renderer = Callable[[NodeConfig, ecr.RegionFacts | None], Rendered]

BOTTLEROCKET_APPLIES = (
    "Bottlerocket aws-k8s-* variants before 1.21.0. Bottlerocket 1.21.0 and later "
    "ship the pause image inside the OS (localhost/kubernetes/pause:0.1.0, built from "
    "upstream; bottlerocket-os/bottlerocket#3940, CHANGELOG v1.21.0) and ignore this "
    "setting (it only logs a deprecation warning; bottlerocket-project-website#550)."
)


def _bottlerocket(cfg: NodeConfig, _facts: ecr.RegionFacts | None) -> Rendered:
    # Setting name and section: Bottlerocket settings API, settings.kubernetes.
    # pod-infra-container-image; its default up to 1.20.x was generated from
    # settings.aws.region (../shared/corpus/bottlerocket/bottlerocket-v1.20.0__...-aws.toml).
    notes = (
        "On 1.21.0 and later this setting changes nothing (the image is local). Before "
        "1.21.0 it names the image the kubelet unit pulls with host-ctr, which has ECR "
        "credentials, when the kubelet starts; updating to 1.21.0 or later removes this "
        "registry pull altogether.",
        "Bottlerocket 1.19.1 and later pin the pause image so the kubelet (1.29+) does "
        "not garbage-collect it (bottlerocket-os/bottlerocket#3757, #3745).",
    )
    text = _header(cfg, BOTTLEROCKET_APPLIES, notes) + (
        f"[settings.kubernetes]\npod-infra-container-image = {_toml_str(cfg.image)}\n"
    )
    return (Document("Bottlerocket user data (TOML)", "toml", BOTTLEROCKET_APPLIES, text),), notes


CONTAINERD1_APPLIES = (
    "containerd 1.x (config version 2), e.g. the EKS AL2 and AL2023 AMIs with containerd 1.7 "
    "(awslabs/amazon-eks-ami nodeadm/internal/containerd/config.template.toml)."
)
CONTAINERD2_APPLIES = (
    "containerd 2.x (config version 3): the sandbox image is a pinned image "
    "(awslabs/amazon-eks-ami nodeadm/internal/containerd/config2.template.toml)."
)


def _containerd1(image: str) -> str:
    # ../shared/corpus/eks-ami/HEAD__nodeadm__internal__containerd__config.template.toml
    return f'[plugins."io.containerd.grpc.v1.cri"]\nsandbox_image = {_toml_str(image)}\n'


def _containerd2(image: str) -> str:
    # ../shared/corpus/eks-ami/HEAD__nodeadm__internal__containerd__config2.template.toml
    return f"[plugins.'io.containerd.cri.v1.images'.pinned_images]\nsandbox = {_toml_str(image)}\n"


def _containerd(cfg: NodeConfig, _facts: ecr.RegionFacts | None) -> Rendered:
    notes = (
        "Merge the section into /etc/containerd/config.toml (or a file it imports) and "
        "restart containerd. containerd pulls the sandbox image itself, without the "
        "kubelet's ECR credential provider: the EKS AMIs pull it once at boot with ECR "
        "credentials; a registry containerd can pull from without credentials avoids the "
        "dependency.",
    )
    one = _header(cfg, CONTAINERD1_APPLIES, notes) + "version = 2\n\n" + _containerd1(cfg.image)
    two = _header(cfg, CONTAINERD2_APPLIES, notes) + "version = 3\n\n" + _containerd2(cfg.image)
    return (
        Document("containerd 1.x config (TOML)", "toml", CONTAINERD1_APPLIES, one),
        Document("containerd 2.x config (TOML)", "toml", CONTAINERD2_APPLIES, two),
    ), notes


AL2_APPLIES = (
    "Amazon Linux 2 EKS AMIs (/etc/eks/bootstrap.sh; EKS publishes AL2 AMIs up to "
    "Kubernetes 1.32). bootstrap.sh builds "
    "<account>.dkr.ecr.<region>.<domain>/eks/pause:<version> for the node's region "
    "(awslabs/amazon-eks-ami templates/al2/runtime/bootstrap.sh, get-ecr-uri.sh)."
)


def _al2(cfg: NodeConfig, _facts: ecr.RegionFacts | None) -> Rendered:
    notes: tuple[str, ...] = ()
    if cfg.mirror:
        # bootstrap.sh: PAUSE_CONTAINER_IMAGE=${PAUSE_CONTAINER_IMAGE:-$ECR_URI/eks/pause}
        repo = cfg.image.rsplit(":", 1)[0]
        line = (
            f"PAUSE_CONTAINER_IMAGE={shlex.quote(repo)} /etc/eks/bootstrap.sh "
            f'"$CLUSTER_NAME" --pause-container-version {shlex.quote(cfg.pause_tag)}'
        )
        notes = (
            "A mirror is not an EKS account, so the image goes in bootstrap.sh's "
            "PAUSE_CONTAINER_IMAGE environment variable; the tag in --pause-container-version.",
        )
    else:
        assert cfg.account is not None  # nosec B101  # no mirror means an EKS account; mypy narrowing
        line = (
            f'/etc/eks/bootstrap.sh "$CLUSTER_NAME" --pause-container-account {cfg.account} '
            f"--pause-container-version {shlex.quote(cfg.pause_tag)}"
        )
    text = _header(cfg, AL2_APPLIES, notes, (f"# Resulting image: {cfg.image}",)) + line + "\n"
    return (Document("Amazon Linux 2 user data (bootstrap.sh)", "shell", AL2_APPLIES, text),), notes


AL2023_APPLIES = (
    "Amazon Linux 2023 EKS AMIs (nodeadm, NodeConfig node.eks.aws/v1alpha1); nodeadm merges "
    "spec.containerd.config into its containerd config. This document carries the containerd "
    "1.x form; on an AMI with containerd 2.x use the 2.x form from `--os containerd`."
)


def _al2023(cfg: NodeConfig, _facts: ecr.RegionFacts | None) -> Rendered:
    doc = {
        "apiVersion": NODEADM_API_VERSION,
        "kind": NODEADM_KIND,
        "spec": {"containerd": {"config": _containerd1(cfg.image)}},
    }
    body = yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=200)
    notes = (
        "Current AL2023 AMIs cache the pause image in the AMI as localhost/kubernetes/pause; "
        "the override matters for nodes whose sandbox image is pulled from a registry.",
        "Add the document as a MIME part (Content-Type: application/node.eks.aws) of the "
        "launch template user data.",
    )
    text = _header(cfg, AL2023_APPLIES, notes) + "---\n" + body
    return (
        Document("Amazon Linux 2023 nodeadm NodeConfig (YAML)", "yaml", AL2023_APPLIES, text),
    ), notes


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded containerd TOML) as ``|`` blocks."""


def _str_block(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_block)


_RENDERERS: dict[NodeOS, Renderer] = {
    NodeOS.BOTTLEROCKET: _bottlerocket,
    NodeOS.AL2: _al2,
    NodeOS.AL2023: _al2023,
    NodeOS.CONTAINERD: _containerd,
}


def _toml_image(data: dict[str, Any]) -> str | None:
    k = data.get("settings", {}).get("kubernetes", {})
    if "pod-infra-container-image" in k:
        return str(k["pod-infra-container-image"])
    cri1 = data.get("plugins", {}).get("io.containerd.grpc.v1.cri", {})
    if "sandbox_image" in cri1:
        return str(cri1["sandbox_image"])
    pinned = data.get("plugins", {}).get("io.containerd.cri.v1.images", {}).get("pinned_images", {})
    if "sandbox" in pinned:
        return str(pinned["sandbox"])
    return None


def check(cfg: NodeConfig) -> None:
    """Parse every rendered document back and check it names ``cfg.image``.

    Raises ``ConfigError`` if a document does not parse or says something else;
    that would be a bug here, and printing it would hand a node a broken config.
    """
    for d in cfg.documents:
        found: str | None
        try:
            if d.format == "toml":
                found = _toml_image(tomllib.loads(d.text))
            elif d.format == "yaml":
                loaded = yaml.safe_load(d.text)
                if not isinstance(loaded, dict) or loaded.get("apiVersion") != NODEADM_API_VERSION:
                    raise ValueError(f"apiVersion is not {NODEADM_API_VERSION}")
                if loaded.get("kind") != NODEADM_KIND:
                    raise ValueError(f"kind is not {NODEADM_KIND}")
                found = _toml_image(tomllib.loads(loaded["spec"]["containerd"]["config"]))
            else:
                found = _shell_image(d.text, cfg)
        except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"rendered {d.title} does not parse: {exc}") from exc
        if found != cfg.image:
            raise ConfigError(f"rendered {d.title} names {found!r}, expected {cfg.image!r}")


def _shell_image(text: str, cfg: NodeConfig) -> str:
    """The image bootstrap.sh would build from the rendered command line."""
    line = next(ln for ln in text.splitlines() if ln and not ln.startswith("#"))
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    flags = {words[i]: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    version = flags["--pause-container-version"]
    if "PAUSE_CONTAINER_IMAGE" in env:
        return f"{env['PAUSE_CONTAINER_IMAGE']}:{version}"
    account = flags["--pause-container-account"]
    facts_host = cfg.registry
    # get-ecr-uri.sh with an account override: <account>.dkr.ecr.<region>.<domain>
    suffix = facts_host.split(".", 1)[1]
    return f"{account}.{suffix}/{PAUSE_REPOSITORY}:{version}"
