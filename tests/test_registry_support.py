"""The probe fixtures themselves, exercised with plain HTTP and boto3 (not the webhook).

If these fail, the probe scenarios (tests/test_probe_scenarios.py) prove nothing:
they would be testing the prober against registries that do not behave as claimed.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import socket
import ssl
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from tests.registry_conftest import CNI_TAG, REFUSED_PASSWORD
from tests.registry_support import (
    MANIFEST_ACCEPT,
    CertAuthority,
    EcrApiStandIn,
    EcrToken,
    FaultRegistry,
    HungServer,
    MotoServer,
    Registry,
    ResetServer,
    basic_auth,
    ecr_token,
    https_request,
)

pytestmark = pytest.mark.slow


def _aws(token: EcrToken) -> str:
    return basic_auth(token.user, token.password)


# ------------------------------------------------------------------- moto


def test_moto_token_is_aws_basic_and_already_expired(moto_ecr: MotoServer,
                                                     moto_token: EcrToken) -> None:
    """moto's token decodes to AWS:<password>; its expiresAt lies in the past
    (moto fixes it at 2015-01-01), which is the "expiresAt in the past" case of issue 8."""
    assert moto_token.user == "AWS"
    assert moto_token.password
    assert moto_token.expires_at < dt.datetime.now(dt.UTC)


def test_moto_token_is_the_same_per_region_and_call(moto_ecr: MotoServer,
                                                    moto_token: EcrToken) -> None:
    """One htpasswd entry fits every region: moto derives the password from the
    account id only.  Asked for another registry id, the password differs (so
    a prober passing ``registryIds`` would need that account's entry)."""
    for region in ("eu-central-1", "us-west-2", "ap-southeast-4"):
        assert ecr_token(moto_ecr.url, region).password == moto_token.password
    other = ecr_token(moto_ecr.url, "us-west-2", registry_ids=["602401143452"])
    assert other.password != moto_token.password


# --------------------------------------------------------------- registries


def test_good_registry_answers_the_ecr_token(good_registry: Registry,
                                             moto_token: EcrToken) -> None:
    answer = good_registry.head_manifest("amazon-k8s-cni", CNI_TAG,
                                         authorization=_aws(moto_token))
    assert answer.status == 200
    assert answer.headers["docker-content-digest"] == \
        good_registry.digests[("amazon-k8s-cni", CNI_TAG)]
    assert answer.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"


def test_nested_repository_paths_are_served(good_registry: Registry,
                                            moto_token: EcrToken) -> None:
    for repo, tag in (("eks/pause", "3.10"), ("amazon/aws-network-policy-agent",
                                              "v1.1.6-eksbuild.1")):
        assert good_registry.head_manifest(repo, tag, authorization=_aws(moto_token)).status == 200


def test_by_digest_is_served(good_registry: Registry, moto_token: EcrToken) -> None:
    digest = good_registry.digests[("amazon-k8s-cni-init", CNI_TAG)]
    answer = good_registry.head_manifest("amazon-k8s-cni-init", digest,
                                         authorization=_aws(moto_token))
    assert answer.status == 200


def test_good_registry_401_without_credentials(good_registry: Registry) -> None:
    answer = good_registry.head_manifest("amazon-k8s-cni", CNI_TAG)
    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Basic realm=")


def test_refusing_registry_401_to_the_ecr_token(refusing_registry: Registry,
                                                moto_token: EcrToken) -> None:
    assert refusing_registry.head_manifest("amazon-k8s-cni", CNI_TAG,
                                           authorization=_aws(moto_token)).status == 401
    # ...while it holds the image: its own password gets it.
    own = basic_auth("AWS", REFUSED_PASSWORD)
    assert refusing_registry.head_manifest("amazon-k8s-cni", CNI_TAG,
                                           authorization=own).status == 200


def test_missing_tag_is_404(good_registry: Registry, moto_token: EcrToken) -> None:
    answer = good_registry.head_manifest("amazon-k8s-cni", "v0.0.0-missing",
                                         authorization=_aws(moto_token))
    assert answer.status == 404


def test_missing_repository_is_404(second_good_registry: Registry,
                                   moto_token: EcrToken) -> None:
    answer = second_good_registry.head_manifest("amazon-k8s-cni", CNI_TAG,
                                                authorization=_aws(moto_token))
    assert answer.status == 404


def test_push_gives_distinct_digests(second_good_registry: Registry,
                                     moto_token: EcrToken) -> None:
    a = second_good_registry.push_image("fixture/a", "t1")
    b = second_good_registry.push_image("fixture/a", "t2")
    assert a != b and a.startswith("sha256:")
    assert second_good_registry.head_manifest("fixture/a", "t2",
                                              authorization=_aws(moto_token)).status == 200


def test_manifest_requests_are_counted(second_good_registry: Registry,
                                       moto_token: EcrToken) -> None:
    reg = second_good_registry
    reg.push_image("fixture/count", "c1")
    before = reg.settled_manifest_count("fixture/count", "c1")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda _: reg.head_manifest("fixture/count", "c1", authorization=_aws(moto_token)),
            range(20)))
    assert {a.status for a in answers} == {200}
    assert reg.settled_manifest_count("fixture/count", "c1") == before + 20
    # Other references are not counted under this one.
    reg.head_manifest("fixture/count", "other", authorization=_aws(moto_token))
    assert reg.settled_manifest_count("fixture/count", "c1") == before + 20
    statuses = [r.status for r in reg.manifest_requests("fixture/count", "other")]
    assert statuses == [404]


def test_registry_tls_is_verified_against_the_ca(good_registry: Registry) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        https_request(good_registry.url, "GET", "/v2/", context=ssl.create_default_context())


def test_expired_certificate_fails_verification(expired_cert_registry: Registry,
                                                registry_ca: CertAuthority,
                                                moto_token: EcrToken) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        expired_cert_registry.head_manifest("amazon-k8s-cni", CNI_TAG,
                                            authorization=_aws(moto_token))
    # Only the certificate is wrong: ignoring it, the image is there.
    lax = registry_ca.client_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    assert expired_cert_registry.head_manifest("amazon-k8s-cni", CNI_TAG, context=lax,
                                               authorization=_aws(moto_token)).status == 200


def test_registry_stops_cleanly(start_registry: object, moto_token: EcrToken) -> None:
    reg = start_registry("short-lived", {"AWS": moto_token.password})  # type: ignore[operator]
    proc = reg.process
    reg.stop()
    assert proc.returncode is not None
    with pytest.raises(OSError):
        https_request(reg.url, "GET", "/v2/", context=reg.ca.client_context(), timeout=2)


# ------------------------------------------------------------ fault stand-ins


def test_hung_registry_times_out(hung_registry: HungServer,
                                 registry_ca: CertAuthority) -> None:
    before = hung_registry.count
    with pytest.raises((TimeoutError, socket.timeout)):
        https_request(hung_registry.url, "HEAD", "/v2/x/manifests/y",
                      context=registry_ca.client_context(), timeout=0.5)
    assert hung_registry.count == before + 1  # the TCP connection was accepted


def test_reset_registry_resets(reset_registry: ResetServer,
                               registry_ca: CertAuthority) -> None:
    with pytest.raises((ConnectionResetError, ssl.SSLError)):
        https_request(reset_registry.url, "HEAD", "/v2/x/manifests/y",
                      context=registry_ca.client_context(), timeout=5)


def test_down_registry_refuses(down_registry_url: str, registry_ca: CertAuthority) -> None:
    with pytest.raises(ConnectionRefusedError):
        https_request(down_registry_url, "HEAD", "/v2/x/manifests/y",
                      context=registry_ca.client_context(), timeout=5)


@pytest.mark.parametrize("fixture,status", [("registry_5xx", 503), ("registry_429", 429)])
def test_fault_registries_answer_their_status(fixture: str, status: int,
                                              request: pytest.FixtureRequest,
                                              registry_ca: CertAuthority) -> None:
    fault: FaultRegistry = request.getfixturevalue(fixture)
    before = fault.count
    answer = https_request(fault.url, "HEAD", "/v2/amazon-k8s-cni/manifests/v1",
                           context=registry_ca.client_context(),
                           headers={"Accept": MANIFEST_ACCEPT})
    assert answer.status == status
    assert fault.count == before + 1
    if status == 429:
        assert answer.headers["retry-after"] == "30"


# ---------------------------------------------------------- ECR API stand-in


def _client(url: str) -> object:
    import boto3
    from botocore.config import Config

    return boto3.client("ecr", region_name="us-west-2", endpoint_url=url,
                        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                        aws_secret_access_key="x",
                        config=Config(retries={"mode": "standard", "total_max_attempts": 2}))


def test_ecr_stand_in_ok_and_expiry(ecr_stand_in: EcrApiStandIn) -> None:
    ecr_stand_in.expires_in = -60
    data = _client(ecr_stand_in.url).get_authorization_token()[  # type: ignore[attr-defined]
        "authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    assert (user, password) == ("AWS", ecr_stand_in.password)
    assert data["expiresAt"] < dt.datetime.now(dt.UTC)
    assert ecr_stand_in.count == 1


@pytest.mark.parametrize("mode,code", [("throttle", "ThrottlingException"),
                                       ("fail", "ServerException"),
                                       ("deny", "AccessDeniedException")])
def test_ecr_stand_in_faults(ecr_stand_in: EcrApiStandIn, mode: str, code: str) -> None:
    ecr_stand_in.mode = mode
    with pytest.raises(ClientError) as info:
        _client(ecr_stand_in.url).get_authorization_token()  # type: ignore[attr-defined]
    assert info.value.response["Error"]["Code"] == code
    # botocore retries throttling and 5xx (total_max_attempts=2), not access denied.
    assert ecr_stand_in.count == (1 if mode == "deny" else 2)


def test_tools_are_installed() -> None:
    """The Debian packages .ci/run installs: the registry, skopeo, htpasswd."""
    for tool in (["docker-registry", "--version"], ["skopeo", "--version"]):
        assert subprocess.run(tool, capture_output=True, check=False).returncode == 0
    out = subprocess.run(["htpasswd", "-nbB", "u", "p"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("u:$2y$")


def test_hung_server_holds_many_connections(hung_registry: HungServer) -> None:
    """100 concurrent clients are all accepted (single-flight tests lean on it)."""
    before = hung_registry.count
    socks: list[socket.socket] = []
    lock = threading.Lock()

    def connect() -> None:
        s = socket.create_connection(("127.0.0.1", hung_registry.port), timeout=5)
        with lock:
            socks.append(s)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: connect(), range(100)))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", hung_registry.port, timeout=0.3)
        with pytest.raises((TimeoutError, socket.timeout)):
            conn.request("GET", "/")
            conn.getresponse()
    finally:
        for s in socks:
            s.close()
    assert hung_registry.count >= before + 100
