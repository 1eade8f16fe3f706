"""pytest plugin: real registries, moto, and fault stand-ins (see tests/registry_support.py).

Registered from tests/conftest.py (``pytest_plugins``).  Everything here is
session-scoped and started lazily: only tests that ask for a fixture pay for it.

The registries stand in for ECR registry hosts through ``--registry-endpoint
HOST=URL`` (issue 8, item 4); ``ProbeWorld.endpoints`` builds that mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registry_support import (
    CertAuthority,
    EcrApiStandIn,
    EcrToken,
    FaultRegistry,
    HungServer,
    MotoServer,
    Registry,
    ResetServer,
    aws_env,
    closed_port_url,
    ecr_token,
    endpoint_flags,
)

# The VPC CNI images of the seed case (issue 8) and the pause image.
CNI_TAG = "v1.19.2-eksbuild.1"
SEED_IMAGES: tuple[tuple[str, str], ...] = (
    ("amazon-k8s-cni", CNI_TAG),
    ("amazon-k8s-cni-init", CNI_TAG),
    ("amazon/aws-network-policy-agent", "v1.1.6-eksbuild.1"),
    ("eks/pause", "3.10"),
)

REFUSED_PASSWORD = "not-the-ecr-token"


@pytest.fixture(scope="session")
def registry_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """The CA of every test registry; pass ``registry_ca.ca_file`` as ``--registry-ca``."""
    return CertAuthority(tmp_path_factory.mktemp("registry-ca"))


@pytest.fixture(scope="session")
def moto_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto in server mode: the ECR API at ``moto_ecr.url`` (``AWS_ENDPOINT_URL_ECR``)."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_token(moto_ecr: MotoServer) -> EcrToken:
    """The token moto hands out (asked without ``registryIds``, as a client in us-west-2).

    Registries that must accept ECR-style Basic auth get user ``AWS`` with its password.
    """
    return ecr_token(moto_ecr.url, "us-west-2")


@pytest.fixture(scope="session")
def moto_aws_env(moto_ecr: MotoServer) -> dict[str, str]:
    """os.environ plus ``AWS_ENDPOINT_URL_ECR`` at moto and fake credentials."""
    return aws_env(moto_ecr.url)


@pytest.fixture(scope="session")
def start_registry(
    registry_ca: CertAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Registry]]:
    """``start_registry(name, users, expired_cert=False)``: a started ``Registry``,
    stopped at the end of the session."""
    started: list[Registry] = []

    def start(name: str, users: Mapping[str, str], *, expired_cert: bool = False) -> Registry:
        reg = Registry(name=name, ca=registry_ca, workdir=tmp_path_factory.mktemp(name),
                       users=dict(users), expired_cert=expired_cert)
        started.append(reg)
        return reg.start()

    try:
        yield start
    finally:
        for reg in started:
            reg.stop()


def _push_seed(reg: Registry) -> None:
    for repo, tag in SEED_IMAGES:
        reg.push_image(repo, tag)


@pytest.fixture(scope="session")
def good_registry(
    start_registry: Callable[..., Registry], moto_token: EcrToken
) -> Registry:
    """A registry that accepts moto's ECR token (stands in for us-west-2); seed images pushed."""
    reg = start_registry("good", {moto_token.user: moto_token.password})
    _push_seed(reg)
    return reg


@pytest.fixture(scope="session")
def second_good_registry(
    start_registry: Callable[..., Registry], moto_token: EcrToken
) -> Registry:
    """Another registry accepting moto's token, with NO images pushed at start (for
    404 and for images a test pushes itself)."""
    return start_registry("good2", {moto_token.user: moto_token.password})


@pytest.fixture(scope="session")
def refusing_registry(start_registry: Callable[..., Registry]) -> Registry:
    """A registry whose htpasswd does not hold the ECR token: it answers 401 to it.

    It holds the same images (pushed with its own password), so the 401 is
    about authorization only: the seed case's eu-central-1.
    """
    reg = start_registry("refusing", {"AWS": REFUSED_PASSWORD})
    _push_seed(reg)
    return reg


@pytest.fixture(scope="session")
def expired_cert_registry(
    start_registry: Callable[..., Registry], moto_token: EcrToken
) -> Registry:
    """The real registry, seed images pushed, serving a certificate that expired yesterday."""
    reg = start_registry("expired", {moto_token.user: moto_token.password}, expired_cert=True)
    _push_seed(reg)  # a client that ignored the expiry would get 200
    return reg


@pytest.fixture(scope="session")
def hung_registry() -> Iterator[HungServer]:
    server = HungServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reset_registry() -> Iterator[ResetServer]:
    server = ResetServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def down_registry_url() -> str:
    return closed_port_url()


@pytest.fixture(scope="session")
def registry_5xx(registry_ca: CertAuthority) -> Iterator[FaultRegistry]:
    server = FaultRegistry(registry_ca, 503)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry_429(registry_ca: CertAuthority) -> Iterator[FaultRegistry]:
    server = FaultRegistry(registry_ca, 429)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ecr_stand_in(moto_token: EcrToken) -> Iterator[EcrApiStandIn]:
    """A fresh ECR API stand-in per test; mode ``ok`` hands out moto's password."""
    server = EcrApiStandIn("ok", password=moto_token.password)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class ProbeWorld:
    """Everything a probe scenario needs, with the registry-endpoint mapping."""

    ca_file: Path
    env: Mapping[str, str]
    good: Registry
    refusing: Registry

    def endpoints(self, mapping: Mapping[str, str]) -> list[str]:
        """``--registry-endpoint HOST=URL`` for each (registry host, base URL)."""
        return endpoint_flags(mapping)


@pytest.fixture(scope="session")
def probe_world(
    registry_ca: CertAuthority, moto_aws_env: dict[str, str],
    good_registry: Registry, refusing_registry: Registry,
) -> ProbeWorld:
    return ProbeWorld(registry_ca.ca_file, moto_aws_env, good_registry, refusing_registry)
