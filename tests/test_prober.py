"""The prober (webhook/prober.py): HTTP, tokens, budget, single flight, cache.

The ECR API is the real moto in server mode (boto3 through
``AWS_ENDPOINT_URL_ECR``).  The registries are ``StandInRegistry`` stand-ins
(tests/probe_support.py): Python HTTPS servers on loopback that answer the
manifest HEAD with the status, challenge or silence a case needs, which a real
``docker-registry`` cannot be told to do on demand.  ``FailingEcr`` stands in
for an ECR API whose token call fails (moto's never does).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.probe_support import MOTO_TOKEN, StandInRegistry, aws_env, moto_server
from tests.serving import admission_review, free_port
from webhook.core.errors import ConfigError
from webhook.core.imageref import parse
from webhook.core.plan import Action, PlanContext, Reason
from webhook.core.policy import policy_from_mapping
from webhook.core.probing import Outcome
from webhook.prober import PAST_EXPIRY_RETRY, Prober, ProberSettings, ProbingAdmit, parse_endpoints

EU = "602401143452.dkr.ecr.eu-central-1.amazonaws.com"
US = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
CNI = "amazon-k8s-cni:v1.19.4"
MIRROR = "mirror.example.com"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in aws_env(moto).items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return moto


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[StandInRegistry]:
    r = StandInRegistry(tmp_path / "reg", basic=MOTO_TOKEN,
                        statuses={("amazon-k8s-cni", "v1.19.4"): 200})  # fmt: skip
    yield r
    r.close()


class Clock:
    """Monotonic time that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def prober_for(*regs: tuple[str, StandInRegistry], **kw: Any) -> Prober:
    """A prober for stand-ins; the budget is the largest allowed (3 s) unless given, so a
    slow, shared machine (moto's first token call) does not decide an outcome."""
    kw.setdefault("budget", 3.0)
    ca = regs[0][1].ca_file if regs else None
    settings = ProberSettings(endpoints={h: r.url for h, r in regs}, ca_file=ca,
                              **{k: v for k, v in kw.items() if k in ProberSettings.__dataclass_fields__})  # noqa: E501
    rest = {k: v for k, v in kw.items() if k not in ProberSettings.__dataclass_fields__}
    return Prober(settings, **rest)


def test_ecr_probe_with_a_moto_token(aws: str, registry: StandInRegistry) -> None:
    p = prober_for((US, registry))
    refs = [parse(f"{US}/{CNI}"), parse(f"{US}/amazon-k8s-cni:missing")]
    try:
        p.prepare(refs)  # boto3's start-up, outside the budget, as the commands do
        got = p.probe_all(refs)
    finally:
        p.close()
    assert got[f"{US}/{CNI}"].outcome is Outcome.AVAILABLE
    assert got[f"{US}/amazon-k8s-cni:missing"].outcome is Outcome.NOT_FOUND
    assert sorted(registry.heads) == ["/v2/amazon-k8s-cni/manifests/missing",
                                      "/v2/amazon-k8s-cni/manifests/v1.19.4"]  # fmt: skip


def test_wrong_token_is_unauthorized(aws: str, tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", basic="c29tZW9uZS1lbHNl", default=200)
    p = prober_for((EU, reg))
    try:
        p.prepare([parse(f"{EU}/{CNI}")])
        got = p.probe_all([parse(f"{EU}/{CNI}")])
    finally:
        p.close()
        reg.close()
    assert got[f"{EU}/{CNI}"].outcome is Outcome.UNAUTHORIZED


@pytest.mark.parametrize(("status", "outcome"), [
    (404, Outcome.NOT_FOUND), (429, Outcome.THROTTLED), (503, Outcome.SERVER_ERROR),
    (403, Outcome.UNAUTHORIZED),
])  # fmt: skip
def test_mirror_statuses(tmp_path: Path, status: int, outcome: Outcome) -> None:
    reg = StandInRegistry(tmp_path / "r", default=status)
    p = prober_for((MIRROR, reg))
    try:
        got = p.probe_all([parse(f"{MIRROR}/eks/{CNI}")])
    finally:
        p.close()
        reg.close()
    assert got[f"{MIRROR}/eks/{CNI}"].outcome is outcome
    assert got[f"{MIRROR}/eks/{CNI}"].cached is False


def test_refused_is_unreachable(tmp_path: Path) -> None:
    p = Prober(ProberSettings(endpoints={MIRROR: f"https://127.0.0.1:{free_port()}"}))
    try:
        got = p.probe_all([parse(f"{MIRROR}/eks/{CNI}")])
    finally:
        p.close()
    assert got[f"{MIRROR}/eks/{CNI}"].outcome is Outcome.UNREACHABLE
    assert got[f"{MIRROR}/eks/{CNI}"].detail == "Connection refused"


def test_untrusted_tls_is_unreachable_and_registry_ca_fixes_it(tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", default=200)
    try:
        bare = Prober(ProberSettings(endpoints={MIRROR: reg.url}))
        got = bare.probe_all([parse(f"{MIRROR}/eks/{CNI}")])
        bare.close()
        assert got[f"{MIRROR}/eks/{CNI}"].outcome is Outcome.UNREACHABLE
        assert "TLS" in got[f"{MIRROR}/eks/{CNI}"].detail
        trusted = prober_for((MIRROR, reg))
        got = trusted.probe_all([parse(f"{MIRROR}/eks/{CNI}")])
        trusted.close()
        assert got[f"{MIRROR}/eks/{CNI}"].outcome is Outcome.AVAILABLE
    finally:
        reg.close()


def test_hung_registry_answers_within_the_budget(tmp_path: Path) -> None:
    hung = StandInRegistry(tmp_path / "h", hang=True)
    ok = StandInRegistry(tmp_path / "o", default=200)
    p = Prober(ProberSettings(endpoints={"hung.example.com": hung.url, MIRROR: ok.url},
                              ca_file=_both_cas(tmp_path, hung, ok)))  # fmt: skip
    try:
        got = p.probe_all([parse(f"hung.example.com/eks/{CNI}"), parse(f"{MIRROR}/eks/{CNI}")],
                          budget=0.5)  # fmt: skip
        # Answered (this call returned), the available one proven, the hung one
        # timed out (or, on a starved machine, still running at the deadline).
        assert got[f"{MIRROR}/eks/{CNI}"].outcome is Outcome.AVAILABLE
        assert got[f"hung.example.com/eks/{CNI}"].outcome in (Outcome.UNREACHABLE,
                                                             Outcome.NO_ANSWER)  # fmt: skip
        time.sleep(0.5)
        again = p.probe_all([parse(f"hung.example.com/eks/{CNI}")], budget=0.5)
        assert again[f"hung.example.com/eks/{CNI}"].outcome is Outcome.UNREACHABLE
        assert again[f"hung.example.com/eks/{CNI}"].cached is True
    finally:
        p.close()
        hung.close()
        ok.close()


def _both_cas(tmp: Path, *regs: StandInRegistry) -> str:
    path = tmp / "cas.pem"
    path.write_text("".join(Path(r.ca_file).read_text() for r in regs))
    return str(path)


def test_bearer_challenge_followed_anonymously(tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", bearer=True, default=200)
    p = prober_for((MIRROR, reg))
    try:
        got = p.probe_all([parse(f"{MIRROR}/eks/pause:3.10"), parse(f"{MIRROR}/eks/{CNI}")])
    finally:
        p.close()
        reg.close()
    assert {v.outcome for v in got.values()} == {Outcome.AVAILABLE}
    assert reg.token_requests >= 1


def test_single_flight_one_probe_for_many_concurrent_admissions(tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", default=200, delay=0.3)
    p = prober_for((MIRROR, reg), budget=2.0)
    ref = parse(f"{MIRROR}/eks/{CNI}")
    try:
        with cf.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: p.probe_all([ref]), range(100)))
    finally:
        p.close()
        reg.close()
    assert len(reg.heads) == 1
    assert {a[str(ref)].outcome for a in answers} == {Outcome.AVAILABLE}


def test_cache_ttls_and_background_refresh(tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", statuses={("eks/pause", "3.10"): 200}, default=404)
    clock = Clock()
    p = prober_for((MIRROR, reg), positive_ttl=100.0, negative_ttl=10.0, clock=clock)
    good, bad = parse(f"{MIRROR}/eks/pause:3.10"), parse(f"{MIRROR}/eks/pause:nope")
    try:
        first = p.probe_all([good, bad])
        assert [first[str(good)].cached, first[str(bad)].cached] == [False, False]
        second = p.probe_all([good, bad])
        assert [second[str(good)].cached, second[str(bad)].cached] == [True, True]
        assert len(reg.heads) == 2
        clock.offset = 11  # the negative answer expired, the positive did not
        third = p.probe_all([good, bad])
        assert (third[str(good)].cached, third[str(bad)].cached) == (True, False)
        assert len(reg.heads) == 3
        clock.offset = 90  # the positive one is in its last quarter: refreshed behind
        fourth = p.probe_all([good])
        assert fourth[str(good)].cached is True
        for _ in range(100):
            if len(reg.heads) == 4:
                break
            time.sleep(0.02)
        assert reg.heads[-1] == "/v2/eks/pause/manifests/3.10"
    finally:
        p.close()
        reg.close()


def test_cache_is_bounded(tmp_path: Path) -> None:
    reg = StandInRegistry(tmp_path / "r", default=200)
    p = prober_for((MIRROR, reg), cache_size=2)
    try:
        p.probe_all([parse(f"{MIRROR}/eks/pause:{i}") for i in range(5)])
        assert len(p._cache) == 2
    finally:
        p.close()
        reg.close()


class CountingEcr:
    """The real boto3 client against moto, with its token calls counted."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls = 0

    def get_authorization_token(self) -> Any:
        self.calls += 1
        return self.client.get_authorization_token()


def test_token_cached_per_region_and_past_expiry_retried_later(
    aws: str, registry: StandInRegistry
) -> None:
    import boto3

    made: dict[str, CountingEcr] = {}

    def factory(region: str, timeout: float) -> CountingEcr:
        made[region] = CountingEcr(boto3.session.Session().client("ecr", region_name=region))
        return made[region]

    wall = [time.time()]
    p = prober_for((US, registry), ecr_client=factory, wall=lambda: wall[0])
    try:
        for tag in ("a", "b", "c"):
            p.probe_all([parse(f"{US}/amazon-k8s-cni:{tag}")])
        # moto's expiresAt is in 2015: used, and not asked again on every probe.
        assert made["us-west-2"].calls == 1
        wall[0] += PAST_EXPIRY_RETRY + 1
        p.probe_all([parse(f"{US}/amazon-k8s-cni:d")])
        assert made["us-west-2"].calls == 2
        assert list(made) == ["us-west-2"]
    finally:
        p.close()


def test_token_refreshed_before_expires_at(registry: StandInRegistry) -> None:
    import datetime as dt

    class Ecr:
        calls = 0

        def get_authorization_token(self) -> Any:
            Ecr.calls += 1
            expires = dt.datetime.fromtimestamp(wall[0] + 12 * 3600, dt.UTC)
            return {"authorizationData": [{"authorizationToken": MOTO_TOKEN,
                                           "expiresAt": expires}]}  # fmt: skip

    wall = [time.time()]
    p = prober_for((US, registry), ecr_client=lambda r, t: Ecr(), wall=lambda: wall[0])
    try:
        p.probe_all([parse(f"{US}/amazon-k8s-cni:a")])
        wall[0] += 8 * 3600
        p.probe_all([parse(f"{US}/amazon-k8s-cni:b")])
        assert Ecr.calls == 1
        wall[0] += 1.5 * 3600  # 9.5 h: past three quarters of 12 h, before expiresAt
        p.probe_all([parse(f"{US}/amazon-k8s-cni:c")])
        assert Ecr.calls == 2
    finally:
        p.close()


class FailingEcr:
    """Stand-in for an ECR API whose token call fails with a botocore ClientError."""

    def __init__(self, code: str, status: int) -> None:
        self.code, self.status = code, status

    def get_authorization_token(self) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": self.code, "Message": "no"},
                           "ResponseMetadata": {"HTTPStatusCode": self.status}},
                          "GetAuthorizationToken")  # fmt: skip


@pytest.mark.parametrize(("code", "status"), [
    ("AccessDeniedException", 400), ("ThrottlingException", 400), ("ServerException", 500),
])  # fmt: skip
def test_failing_token_call_is_no_answer_and_backs_off(registry: StandInRegistry, code: str,
                                                       status: int) -> None:  # fmt: skip
    """No registry answered: no evidence (static rules decide), and the failing
    call is not repeated by the next probes."""
    refreshes: list[bool] = []

    class Observer:
        def probed(self, registry: str, outcome: str, seconds: float) -> None: ...
        def cache_lookup(self, hit: bool) -> None: ...
        def token_refresh(self, ok: bool) -> None:
            refreshes.append(ok)
        def out_of_budget(self) -> None: ...

    p = prober_for((US, registry), ecr_client=lambda r, t: FailingEcr(code, status),
                   observer=Observer())  # fmt: skip
    try:
        got = p.probe_all([parse(f"{US}/{CNI}")])
        again = p.probe_all([parse(f"{US}/amazon-k8s-cni:other")])
    finally:
        p.close()
    assert got[f"{US}/{CNI}"].outcome is Outcome.NO_ANSWER
    assert got[f"{US}/{CNI}"].detail == f"token: {code}"
    assert again[f"{US}/amazon-k8s-cni:other"].outcome is Outcome.NO_ANSWER
    assert refreshes == [False]  # one call, not one per probe
    assert registry.heads == []


def test_probing_admit_seed_case(aws: str, tmp_path: Path) -> None:
    eu = StandInRegistry(tmp_path / "eu", basic="bm9wZQ==", default=200)
    us = StandInRegistry(tmp_path / "us", basic=MOTO_TOKEN, default=200)
    p = Prober(ProberSettings(endpoints={EU: eu.url, US: us.url}, budget=3.0,
                              ca_file=_both_cas(tmp_path, eu, us)))  # fmt: skip
    ctx = PlanContext.build(policy_from_mapping({"fallbackRegions": ["us-west-2"]}),
                            "eu-central-1")  # fmt: skip
    admit = ProbingAdmit(lambda: p, enabled=True, budget=3.0)
    try:
        p.prepare([parse(f"{EU}/{CNI}"), parse(f"{US}/{CNI}")])
        out = admit(admission_review(_pod(f"{EU}/{CNI}")), ctx)
    finally:
        p.close()
        eu.close()
        us.close()
    (d,) = out.plan.decisions
    assert (d.action, d.reason, d.target) == (Action.REWRITE, Reason.UNAUTHORIZED, f"{US}/{CNI}")
    assert [p.outcome for p in d.probes] == [Outcome.UNAUTHORIZED, Outcome.AVAILABLE]


def _pod(image: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "kube-system"},
            "spec": {"containers": [{"name": "aws-node", "image": image}]}}  # fmt: skip


def test_a_broken_prober_never_fails_the_admission() -> None:
    """A prober that raises stands in for any bug in the probing shell."""
    errors: list[BaseException] = []

    def broken() -> Prober:
        raise RuntimeError("prober exploded")

    ctx = PlanContext.build(policy_from_mapping(None), "ap-southeast-4")
    admit = ProbingAdmit(broken, enabled=True, budget=1.0, on_error=errors.append)
    out = admit(admission_review(_pod(f"602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/{CNI}")),
                ctx)  # fmt: skip
    (d,) = out.plan.decisions
    assert d.reason is Reason.WRONG_ACCOUNT  # the static rule still holds
    assert len(errors) == 1


def test_probing_off_is_the_static_path() -> None:
    called = threading.Event()

    def never() -> Prober:
        called.set()
        raise AssertionError("probed although probing is off")

    ctx = PlanContext.build(policy_from_mapping(None), "ap-southeast-4")
    out = ProbingAdmit(never, enabled=False, budget=None)(
        admission_review(_pod(f"602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/{CNI}")), ctx)
    assert not called.is_set()
    assert out.plan.decisions[0].probes == ()


@pytest.mark.parametrize("value", ["nohost", "h=ftp://x", "h=https://x/path", "=https://x"])
def test_registry_endpoint_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="--registry-endpoint"):
        parse_endpoints([value])


def test_registry_endpoint_form() -> None:
    assert parse_endpoints([f"{US}=https://127.0.0.1:5000/"]) == {US: "https://127.0.0.1:5000"}


# --------------------------------------------------------------------- the server


@pytest.mark.slow
def test_serve_with_probe_seed_case_patch_audit_and_metrics(aws: str, tmp_path: Path) -> None:
    """``serve --probe``: the seed case through gunicorn over TLS, one worker."""
    import json
    import os

    from tests.serving import (
        ServerProcess,
        apiserver_tls_context,
        decode_patch,
        ecr_webhook,
        post_review,
    )
    from tests.test_server import metrics, sample
    from webhook import certs

    eu = StandInRegistry(tmp_path / "eu", basic="bm9wZQ==", default=200)
    us = StandInRegistry(tmp_path / "us", basic=MOTO_TOKEN, default=200)
    paths = certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp_path)
    port, mport = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(mport), "--cert-file", str(paths["tls.crt"]),
            "--key-file", str(paths["tls.key"]), "--region", "eu-central-1",
            "--audit-log", str(audit), "--workers", "1", "--probe",
            "--fallback-region", "us-west-2", "--registry-endpoint", f"{EU}={eu.url}",
            "--registry-endpoint", f"{US}={us.url}", "--registry-ca", _both_cas(tmp_path, eu, us),
            "--probe-timeout", "3"]  # fmt: skip
    server = ServerProcess(argv, env=os.environ, stderr=tmp_path / "err.log")
    ctx = apiserver_tls_context(paths["ca.crt"])
    try:
        server.wait_ready(port, ctx)
        answers = [post_review(port, ctx, admission_review(_pod(f"{EU}/{CNI}"), uid=f"u{i}"))
                   for i in range(3)]  # fmt: skip
        for status, body in answers:
            assert status == 200
            ops = decode_patch(body["response"])
            assert {"op": "replace", "path": "/spec/containers/0/image",
                    "value": f"{US}/{CNI}"} in ops  # fmt: skip
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        (c,) = records[0]["containers"]
        assert (c["reason"], c["to"], c["rule"]) == ("unauthorized", f"{US}/{CNI}",
                                                     "fallbackRegions[0]")  # fmt: skip
        assert [(p["candidate"], p["outcome"]) for p in c["probes"]] == [
            (f"{EU}/{CNI}", "unauthorized"), (f"{US}/{CNI}", "available")]
        # Later admissions are answered from the cache.
        assert [p["cached"] for p in records[-1]["containers"][0]["probes"]] == [True, True]
        assert len(us.heads) == 1
        scrape = metrics(mport)
        assert sample(scrape, "ecr_webhook_probes_total", registry=US, outcome="available") == 1
        assert sample(scrape, "ecr_webhook_probes_total", registry="other",
                      outcome="unauthorized") == 0  # fmt: skip
        assert sample(scrape, "ecr_webhook_probe_cache_lookups_total", result="hit") >= 4
        assert sample(scrape, "ecr_webhook_registry_token_refreshes_total", result="success") >= 1
    finally:
        server.stop()
        eu.close()
        us.close()


# --------------------------------------------------------------------- the commands


def _run_cli(args: list[str], env: dict[str, str]) -> Any:
    import subprocess

    from tests.serving import ecr_webhook

    return subprocess.run([*ecr_webhook(), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


@pytest.mark.slow
def test_dry_run_and_probe_commands_seed_case(moto: str, tmp_path: Path) -> None:
    import json

    eu = StandInRegistry(tmp_path / "eu", basic="bm9wZQ==", default=200)
    us = StandInRegistry(tmp_path / "us", basic=MOTO_TOKEN,
                         statuses={("amazon-k8s-cni", "v1.19.4"): 200})  # fmt: skip
    flags = ["--region", "eu-central-1", "--fallback-region", "us-west-2",
             "--registry-endpoint", f"{EU}={eu.url}", "--registry-endpoint", f"{US}={us.url}",
             "--registry-ca", _both_cas(tmp_path, eu, us), "--probe-timeout", "3"]  # fmt: skip
    pod = tmp_path / "pod.json"
    pod.write_text(json.dumps(_pod(f"{EU}/{CNI}")))
    try:
        r = _run_cli(["dry-run", "--probe", *flags, "-f", str(pod), "-o", "json"], aws_env(moto))
        assert r.returncode == 0, r.stderr
        (obj,) = json.loads(r.stdout)["objects"]
        (rw,) = obj["rewrites"]
        assert (rw["to"], rw["reason"]) == (f"{US}/{CNI}", "unauthorized")
        assert [p["outcome"] for p in rw["probes"]] == ["unauthorized", "available"]
        (d,) = obj["decisions"]
        assert (d["action"], d["rule"]) == ("rewrite", "fallbackRegions[0]")

        r = _run_cli(["probe", f"{EU}/{CNI}", *flags], aws_env(moto))
        assert r.returncode == 0, r.stderr
        assert f"pick: {US}/{CNI} (rewrite: unauthorized, fallbackRegions[0]" in r.stdout
        r = _run_cli(["probe", f"{EU}/amazon-k8s-cni:v0", *flags, "-o", "json"], aws_env(moto))
        assert r.returncode == 1, r.stderr
        doc = json.loads(r.stdout)
        assert doc["pick"] is None and doc["decision"]["reason"] == "no-target"
        assert [c["outcome"] for c in doc["candidates"]] == ["unauthorized", "not-found"]
        # Without --probe dry-run asks no registry.
        heads = len(us.heads)
        r = _run_cli(["dry-run", *flags, "-f", str(pod), "-o", "json"], aws_env(moto))
        assert json.loads(r.stdout)["objects"][0]["rewrites"] == []
        assert len(us.heads) == heads
    finally:
        eu.close()
        us.close()


@pytest.mark.parametrize(("flag", "needle"), [
    (["--registry-endpoint", "nope"], "--registry-endpoint"),
    (["--registry-ca", "/nonexistent/ca.pem"], "--registry-ca"),
    (["--probe-timeout", "30"], "--probe-timeout"),
    (["--fallback-region", "atlantis-1"], "--fallback-region"),
])  # fmt: skip
def test_probe_flag_errors_are_one_line(tmp_path: Path, flag: list[str], needle: str) -> None:
    pod = tmp_path / "pod.json"
    pod.write_text("{}")
    r = _run_cli(["dry-run", "--probe", *flag, "-f", str(pod)], dict(__import__("os").environ))
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_old_token_refused_is_replaced_and_the_probe_retried(tmp_path: Path) -> None:
    import base64
    import datetime as dt

    new = base64.b64encode(b"AWS:new-password").decode()
    reg = StandInRegistry(tmp_path / "r", basic=new, default=200)
    tokens = [MOTO_TOKEN, new]
    wall = [time.time()]

    class Ecr:
        calls = 0

        def get_authorization_token(self) -> Any:
            Ecr.calls += 1
            expires = dt.datetime.fromtimestamp(wall[0] + 12 * 3600, dt.UTC)
            return {"authorizationData": [{"authorizationToken": tokens[Ecr.calls - 1],
                                           "expiresAt": expires}]}  # fmt: skip

    p = prober_for((US, reg), ecr_client=lambda r, t: Ecr(), wall=lambda: wall[0])
    try:
        first = p.probe_all([parse(f"{US}/amazon-k8s-cni:a")])
        assert first[f"{US}/amazon-k8s-cni:a"].outcome is Outcome.UNAUTHORIZED  # fresh: no retry
        wall[0] += 3600  # the cached token is an hour old when the registry refuses it
        second = p.probe_all([parse(f"{US}/amazon-k8s-cni:b")])
        assert second[f"{US}/amazon-k8s-cni:b"].outcome is Outcome.AVAILABLE
        assert Ecr.calls == 2
    finally:
        p.close()
        reg.close()


def test_single_flight_across_processes_shares_one_probe(tmp_path: Path) -> None:
    """Two probers on one shared directory stand for two gunicorn workers.

    ``flock`` locks belong to open file descriptions, so two probers in one
    process contend exactly as two processes do.
    """
    reg = StandInRegistry(tmp_path / "r", default=200, delay=0.3)
    shared = str(tmp_path / "shared")
    probers = [prober_for((MIRROR, reg), budget=2.0, shared_dir=shared) for _ in range(2)]
    ref = parse(f"{MIRROR}/eks/{CNI}")
    try:
        with cf.ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda i: probers[i % 2].probe_all([ref]), range(100)))
    finally:
        for p in probers:
            p.close()
        reg.close()
    assert len(reg.heads) == 1
    assert {a[str(ref)].outcome for a in answers} == {Outcome.AVAILABLE}


@pytest.mark.slow
def test_serve_two_workers_one_probe_for_100_concurrent_admissions(
    aws: str, tmp_path: Path
) -> None:
    """``serve --probe --workers 2``: 100 concurrent admissions of one cold image, one HEAD."""
    import os

    from tests.serving import ServerProcess, apiserver_tls_context, ecr_webhook, post_review
    from webhook import certs

    us = StandInRegistry(tmp_path / "us", basic=MOTO_TOKEN, default=200, delay=0.2)
    paths = certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp_path)
    port = free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(free_port()), "--cert-file", str(paths["tls.crt"]),
            "--key-file", str(paths["tls.key"]), "--region", "us-west-2",
            "--audit-log", str(tmp_path / "audit.jsonl"), "--workers", "2", "--threads", "8",
            "--probe", "--registry-endpoint", f"{US}={us.url}", "--registry-ca", us.ca_file,
            "--probe-timeout", "3"]  # fmt: skip
    server = ServerProcess(argv, env=os.environ, stderr=tmp_path / "err.log")
    ctx = apiserver_tls_context(paths["ca.crt"])
    try:
        server.wait_ready(port, ctx)
        # One admission of another image first: the workers' ECR tokens are
        # fetched; the image of the burst is still cold.
        post_review(port, ctx, admission_review(_pod(f"{US}/amazon-k8s-cni:warm-up")), timeout=20)
        body = admission_review(_pod(f"{US}/amazon-k8s-cni:cold-1"))
        with cf.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: post_review(port, ctx, body, timeout=20),
                                    range(100)))  # fmt: skip
        assert {status for status, _ in answers} == {200}
        assert us.heads.count("/v2/amazon-k8s-cni/manifests/cold-1") == 1
    finally:
        server.stop()
        us.close()


def test_token_that_expires_soon_is_refreshed_before_expires_at(tmp_path: Path) -> None:
    """A token living 2 s is asked again at three quarters of its life; one that
    expired while cached and is refused is replaced at once."""
    import base64
    import datetime as dt

    second = base64.b64encode(b"AWS:second").decode()
    reg = StandInRegistry(tmp_path / "r", basic=MOTO_TOKEN, default=200)
    wall = [time.time()]
    tokens = [MOTO_TOKEN, second, second]

    class Ecr:
        calls = 0

        def get_authorization_token(self) -> Any:
            Ecr.calls += 1
            expires = dt.datetime.fromtimestamp(wall[0] + 2, dt.UTC)
            return {"authorizationData": [{"authorizationToken": tokens[Ecr.calls - 1],
                                           "expiresAt": expires}]}  # fmt: skip

    p = prober_for((US, reg), ecr_client=lambda r, t: Ecr(), wall=lambda: wall[0])
    try:
        assert p.probe_all([parse(f"{US}/x:a")])[f"{US}/x:a"].outcome is Outcome.AVAILABLE
        wall[0] += 1.0
        assert p.probe_all([parse(f"{US}/x:b")])[f"{US}/x:b"].outcome is Outcome.AVAILABLE
        assert Ecr.calls == 1
        reg.basic = second  # the registry now wants the next token
        wall[0] += 0.6  # 1.6 s: past three quarters of the token's 2 s
        assert p.probe_all([parse(f"{US}/x:c")])[f"{US}/x:c"].outcome is Outcome.AVAILABLE
        assert Ecr.calls == 2
    finally:
        p.close()
        reg.close()
