"""Probe deadlines (README "Reliability"): figures for a trickling registry, a hung STS
and the latency of a healthy probe.  Run from the repository root::

    .venv/bin/python bench/probe_deadlines.py trickle   # a byte every 0.2 s, 0.8 s limit
    .venv/bin/python bench/probe_deadlines.py sts       # IRSA: STS accepts and never answers
    .venv/bin/python bench/probe_deadlines.py healthy   # 300 HEADs to a real docker-registry

Figures only, nothing asserted (tests/test_probe_deadlines.py asserts the
behaviour).  The trickling server is the test's fault injector: Debian's
docker-registry cannot be made to trickle.
"""

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.registry_support import (
    CertAuthority,
    HungServer,
    MotoServer,
    Registry,
    aws_env,
    ecr_token,
    eks_registry_host,
)
from tests.test_probe_deadlines import Trickler
from webhook import prober as pm
from webhook.core.imageref import parse
from webhook.core.probing import Probe
from webhook.prober import Prober, ProberSettings

IMAGE = "/eks/pause:3.10"
SHAPES = [("headers", "http"), ("headers", "https"), ("body", "http"), ("body", "https"),
          ("handshake", "https")]  # fmt: skip


def timed(fn: Callable[[], Probe], wait: float) -> tuple[Probe | None, float]:
    """``fn()`` in a daemon thread; (its answer or None if still running, seconds waited)."""
    out: list[Probe] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t0 = time.perf_counter()
    th.start()
    th.join(wait)
    return (out[0] if out else None), time.perf_counter() - t0


def trickle(ca: CertAuthority) -> None:
    for mode, scheme in SHAPES:
        t = Trickler(mode, ca.server_context(f"t-{mode}") if scheme == "https" else None)
        p = Prober(ProberSettings(endpoints={"trickle.example.com": t.url},
                                  ca_file=str(ca.ca_file)))  # fmt: skip
        got, took = timed(lambda p=p: p.probe_now(parse("trickle.example.com" + IMAGE), 0.8), 10)
        if got is not None:
            print(f"{mode}/{scheme}: limit 0.8 s -> {got.outcome} '{got.detail}' after "
                  f"{took:.2f} s, {t.sent} bytes trickled")  # fmt: skip
        else:
            print(f"{mode}/{scheme}: limit 0.8 s -> still running after {took:.1f} s, "
                  f"{t.sent} bytes trickled")  # fmt: skip
        t.stop()
        p.close()


def sts(tmp: Path) -> None:
    moto = MotoServer(tmp / "moto").start()
    hung = HungServer()
    env = aws_env(moto.url)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k)
    (tmp / "tok").write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    env.update(AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp / "tok"),
               AWS_ROLE_ARN="arn:aws:iam::123456789012:role/x",
               AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{hung.port}")  # fmt: skip
    os.environ.clear()
    os.environ.update(env)
    p = Prober()
    p._client("us-west-2")  # boto3's start-up is not the token call's time
    got, took = timed(lambda: p.probe_now(parse(eks_registry_host("us-west-2") + IMAGE), 1.0), 30)
    said = f"{got.outcome} '{got.detail}' after {took:.2f} s" if got else \
        f"still running after {took:.0f} s"  # fmt: skip
    print(f"hung STS, TOKEN_TIMEOUT {pm.TOKEN_TIMEOUT} s: {said}, STS connections {hung.count}")
    moto.stop()


def healthy(tmp: Path, ca: CertAuthority) -> None:
    moto = MotoServer(tmp / "moto").start()
    tok = ecr_token(moto.url, "us-west-2")
    reg = Registry(name="h", ca=ca, workdir=tmp / "reg", users={tok.user: tok.password}).start()
    reg.push_image("eks/pause", "3.10")
    os.environ.update(aws_env(moto.url))
    host = eks_registry_host("us-west-2")
    p = Prober(ProberSettings(endpoints={host: reg.url}, ca_file=str(ca.ca_file)))
    p.prepare([parse(host + IMAGE)])
    lat = [p.probe_now(parse(host + IMAGE), 1.0) for _ in range(300)]
    outcomes = {str(x.outcome) for x in lat}
    ms = sorted(x.latency_ms for x in lat[20:])
    print(f"healthy HEAD (real docker-registry, TLS, keep-alive), 280 probes: outcomes "
          f"{sorted(outcomes)}, median {statistics.median(ms):.2f} ms, "
          f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms")  # fmt: skip
    p.close()
    reg.stop()
    moto.stop()


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    tmp = Path(tempfile.mkdtemp())
    ca = CertAuthority(tmp / "ca")
    if what == "trickle":
        trickle(ca)
    elif what == "sts":
        sts(tmp)
    elif what == "healthy":
        healthy(tmp, ca)
    else:
        print("usage: bench/probe_deadlines.py trickle|sts|healthy", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
