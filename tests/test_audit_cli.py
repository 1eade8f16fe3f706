"""``ecr-webhook audit`` over audit logs written by the real server.

Two replicas of the real server (gunicorn over TLS on loopback) answer real
AdmissionReviews sent alternately, one at a time, so the records' time order
is the order the reviews were sent:

* replica A is ``ecr-webhook serve --audit-log - -v 2`` with stdout and stderr
  in one file, as ``kubectl logs`` shows a pod: audit records mixed with
  operational log lines;
* replica B writes a rotated file (a small ``audit_max_bytes``, so it rotates
  many times), and its older backups are then gzipped as logrotate would.
  B's availability oracle fails for one registry host, so some admissions fail
  open (``decision: error``).  That oracle is a stand-in (as in
  tests/test_app.py): no real registry prober exists yet to fail; the rest of
  the path is real.

The expected answers come from what was sent (scenario names in the uids),
never from the reader itself.  CloudWatch Logs is moto in server mode, reached
through ``AWS_ENDPOINT_URL_LOGS``, holding the same records wrapped as Fluent
Bit ships them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.serving import (
    REGION,
    SOURCE_REGISTRY,
    TARGET_REGISTRY,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    aws_node_pod,
    ecr_webhook,
    free_port,
    post_review,
)
from webhook.config import ServeConfig

pytestmark = pytest.mark.slow

FLAKY = "999999999999.dkr.ecr.ap-southeast-4.amazonaws.com"
FIPS = "602401143452.dkr.ecr-fips.ap-southeast-4.amazonaws.com"
CHINA = "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn"
ROUNDS = 3
RUN_FLAKY = """
import json, sys
from webhook import logs
from webhook.app import create_app
from webhook.auditlog import AuditLog
from webhook.config import ServeConfig
from webhook.core import ecr
from webhook.core.plan import Cluster, StaticOracle
from webhook.core.policy import Policy
from webhook.server import run

config = ServeConfig(**json.loads(sys.argv[1]))
facts = ecr.default_facts()
static = StaticOracle(facts, Policy(), Cluster.for_region(config.region, facts))

class Flaky:
    static = False
    def check(self, ref):
        if ref.host.startswith("999999999999."):
            raise RuntimeError(f"probe of {ref.host} timed out")
        return static.check(ref)

def factory(config):
    # The path is checked before every record (not every 50 ms), so that these
    # sequential admissions rotate at the same records on every run and the
    # logs always have the shapes test_the_logs_are_what_the_test_means checks.
    audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes,
                     backups=config.audit_backups, recheck_seconds=0)
    return create_app(config, audit=audit, oracle=Flaky(), log=logs.Log(verbosity=1))

raise SystemExit(run(config, app_factory=factory))
"""


def pod(name: str, namespace: str, *images: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]},
    }


def scenarios() -> list[tuple[str, dict[str, Any]]]:
    """(name, AdmissionReview): one of each kind of answer the server gives."""
    alice = admission_review(
        pod("tool", "team-a", f"{SOURCE_REGISTRY}/EKS/pause:3.10", f"{FIPS}/eks/pause:3.10",
            f"{CHINA}/eks/pause:3.10"), namespace="team-a")  # fmt: skip
    alice["request"]["userInfo"] = {"username": "alice", "groups": ["system:authenticated"]}
    return [
        ("aws-node", admission_review()),
        ("aws-node-dry", admission_review(dry_run=True)),
        ("at-target", admission_review(aws_node_pod(TARGET_REGISTRY))),
        ("alice", alice),
        (
            "excluded",
            admission_review(
                pod("x", "ecr-webhook", f"{SOURCE_REGISTRY}/eks/pause:3"), namespace="ecr-webhook"
            ),
        ),
        (
            "flaky",
            admission_review(pod("f", "team-b", f"{FLAKY}/eks/pause:3.10"), namespace="team-b"),
        ),
        ("nginx", admission_review(pod("web", "team-b", "nginx:1.27"), namespace="team-b")),
    ]


@dataclass
class Logs:
    tmp: Path
    a_log: Path  # replica A: stdout + stderr of the pod
    b_dir: Path  # replica B: audit.jsonl, audit.jsonl.1, ... (.gz)
    sent: list[str]  # uids in the order sent: "<replica>-<round>-<scenario>"
    raw: dict[str, bytes]  # uid -> the record line as the server wrote it

    def uids(self, *names: str, replica: str = "AB") -> list[str]:
        """The uids sent for these scenarios (``name:B`` limits one of them to replica B)."""
        want = {n.partition(":")[0]: n.partition(":")[2] or replica for n in names}
        return [u for u in self.sent if u[0] in want.get(u.split("-", 2)[2], "")]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in scenarios()]


def cli(*args: str, stdin: bytes | None = None,
        env: dict[str, str] | None = None) -> tuple[int, bytes, str]:  # fmt: skip
    p = subprocess.run([*ecr_webhook(), "audit", *args], input=stdin, capture_output=True,
                       timeout=120, check=False, env=env)  # fmt: skip
    return p.returncode, p.stdout, p.stderr.decode()


def uids_of(out: bytes) -> list[str]:
    return [json.loads(x)["auditID"] for x in out.splitlines()]


def read_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.splitlines()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logs]:
    tmp = tmp_path_factory.mktemp("auditlogs")
    tls = tmp / "tls"
    subprocess.run([*ecr_webhook(), "certs", "generate", "--out-dir", str(tls), "--dns",
                    "localhost", "--ip", "127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    ctx = apiserver_tls_context(tls / "ca.crt")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    pa, pb = free_port(), free_port()
    a = ServerProcess(
        ["sh", "-c", 'exec "$@" 2>&1', "sh", *ecr_webhook(), "serve", "--host", "127.0.0.1",
         "--port", str(pa), "--metrics-port", str(free_port()), "--cert-file",
         str(tls / "tls.crt"), "--key-file", str(tls / "tls.key"), "--region", REGION,
         "--audit-log", "-", "-v", "2", "--workers", "2", "--threads", "2"],
        stdout=tmp / "a" / "pod.log")  # fmt: skip
    config = ServeConfig(host="127.0.0.1", port=pb, metrics_port=free_port(),
                         cert_file=str(tls / "tls.crt"), key_file=str(tls / "tls.key"),
                         region=REGION, audit_log=str(tmp / "b" / "audit.jsonl"),
                         audit_max_bytes=2500, audit_backups=200, workers=2,
                         threads=2)  # fmt: skip
    b = ServerProcess([sys.executable, "-c", RUN_FLAKY, json.dumps(asdict(config))],
                      stderr=tmp / "b-stderr.log")  # fmt: skip
    sent: list[str] = []
    try:
        a.wait_ready(pa, ctx)
        b.wait_ready(pb, ctx)
        for r in range(ROUNDS):
            for name, review in scenarios():
                for replica, port in (("A", pa), ("B", pb)):
                    uid = f"{replica}-{r}-{name}"
                    review["request"]["uid"] = uid
                    status, doc = post_review(port, ctx, review)
                    assert status == 200 and doc["response"]["uid"] == uid
                    sent.append(uid)
    finally:
        assert a.stop() == 0
        assert b.stop() == 0, b.stderr()
    (tmp / "b" / "audit.jsonl.lock").unlink()
    # logrotate with delaycompress: every backup but the newest is gzipped.
    for f in (tmp / "b").iterdir():
        m = re.fullmatch(r"audit\.jsonl\.(\d+)", f.name)
        if m and int(m.group(1)) >= 2:
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
            f.unlink()
    raw = {}
    for f in [tmp / "a" / "pod.log", *(tmp / "b").iterdir()]:
        for line in read_lines(f):
            if line.startswith(b'{"kind":"EcrWebhookAudit"'):
                raw[json.loads(line)["auditID"]] = line
    assert sorted(raw) == sorted(sent), "the server wrote one record per admission"
    yield Logs(tmp, tmp / "a" / "pod.log", tmp / "b", sent, raw)


# --------------------------------------------------------------------- files and order


def test_the_logs_are_what_the_test_means(logs: Logs) -> None:
    """Mixed with operational lines, rotated, gzipped: the shapes the reader must handle."""
    a_lines = logs.a_log.read_bytes().splitlines()
    assert any(b'"msg":"admission"' in x for x in a_lines)  # -v 2 operational lines
    assert any(b'"msg":"serving"' in x for x in a_lines)
    names = sorted(f.name for f in logs.b_dir.iterdir())
    assert "audit.jsonl" in names and "audit.jsonl.1" in names
    assert len([n for n in names if n.endswith(".gz")]) >= 3


def test_all_records_of_both_replicas_in_time_order(logs: Logs) -> None:
    code, out, err = cli("--output", "json", str(logs.b_dir), str(logs.a_log))
    assert code == 0, err
    assert err == ""
    # Sent one at a time, alternately: time order is send order, A and B interleaved.
    assert uids_of(out) == logs.sent
    # Byte for byte as logged.
    assert out.splitlines() == [logs.raw[u] for u in logs.sent]


def test_stdin_skips_operational_lines(logs: Logs) -> None:
    code, out, err = cli("-", "--output", "json", stdin=logs.a_log.read_bytes())
    assert code == 0 and err == ""
    assert uids_of(out) == [u for u in logs.sent if u[0] == "A"]


def test_kubectl_logs_prefix_of_several_replicas_on_stdin(logs: Logs) -> None:
    """`kubectl logs -l app=ecr-webhook --prefix`: each line starts with its pod's name."""
    lines = [b"[pod/ecr-webhook-a/webhook] " + x for x in logs.a_log.read_bytes().splitlines()]
    lines += [b"[pod/ecr-webhook-b/webhook] " + x
              for f in sorted(logs.b_dir.iterdir()) for x in read_lines(f)]  # fmt: skip
    code, out, _ = cli("-", "--output", "json", "--namespace", "kube-system",
                       stdin=b"\n".join(lines) + b"\n")  # fmt: skip
    assert code == 0
    expected = logs.uids("aws-node", "aws-node-dry", "at-target")
    assert sorted(uids_of(out)) == sorted(expected)


# --------------------------------------------------------------------- filters


FILTERS: list[tuple[list[str], tuple[str, ...], str]] = [
    (["--namespace", "kube-system"], ("aws-node", "aws-node-dry", "at-target"), "AB"),
    (["--namespace", "team-a", "--namespace", "ecr-webhook"], ("alice", "excluded"), "AB"),
    (["--decision", "error"], ("flaky",), "B"),
    (["--decision", "skipped"], ("excluded",), "AB"),
    # Replica A has no failing oracle: there the flaky registry's image is just kept.
    (["--decision", "unchanged"], ("at-target", "nginx", "flaky:A"), "AB"),
    (["--reason", "wrong-partition"], ("alice",), "AB"),
    (["--reason", "invalid-reference"], ("alice",), "AB"),
    (["--image", "*ecr-fips*"], ("alice",), "AB"),
    (
        ["--image", f"{TARGET_REGISTRY}/amazon-k8s-cni:*"],
        ("aws-node", "aws-node-dry", "at-target"),
        "AB",
    ),
    (["--image", "nginx:*"], ("nginx",), "AB"),
    (["--user", "alice"], ("alice",), "AB"),
    (["--owner", "DaemonSet/aws-node"], ("aws-node", "aws-node-dry", "at-target"), "AB"),
    (["--owner", "daemonset/aws-node"], ("aws-node", "aws-node-dry", "at-target"), "AB"),
    (["--dry-run"], ("aws-node-dry",), "AB"),
    (
        ["--no-dry-run", "--namespace", "kube-system", "--decision", "patched"],
        ("aws-node",),
        "AB",
    ),
]


@pytest.mark.parametrize(("args", "names", "replicas"), FILTERS,
                         ids=[" ".join(a) for a, _, _ in FILTERS])  # fmt: skip
def test_filters(logs: Logs, args: list[str], names: tuple[str, ...], replicas: str) -> None:
    code, out, err = cli(str(logs.a_log), str(logs.b_dir), "--output", "json", *args)
    assert code == 0, err
    assert uids_of(out) == logs.uids(*names, replica=replicas)


def test_no_dry_run_is_everything_else(logs: Logs) -> None:
    code, out, _ = cli(str(logs.a_log), str(logs.b_dir), "-o", "json", "--no-dry-run")
    assert code == 0
    assert uids_of(out) == [u for u in logs.sent if not u.endswith("-aws-node-dry")]


def _plus_micro(ts: str) -> str:
    head, micros = ts[:20], int(ts[20:26])
    assert micros < 999_999
    return f"{head}{micros + 1:06d}Z"


def test_time_bounds_at_the_edges(logs: Logs) -> None:
    k = logs.sent.index("B-1-alice")
    t = json.loads(logs.raw["B-1-alice"])["requestReceivedTimestamp"]
    t2 = json.loads(logs.raw["A-2-aws-node"])["requestReceivedTimestamp"]
    k2 = logs.sent.index("A-2-aws-node")
    src = (str(logs.a_log), str(logs.b_dir), "-o", "json")
    assert uids_of(cli(*src, "--since", t)[1]) == logs.sent[k:]  # inclusive
    assert uids_of(cli(*src, "--until", t)[1]) == logs.sent[:k]  # exclusive
    assert uids_of(cli(*src, "--since", _plus_micro(t))[1]) == logs.sent[k + 1 :]
    assert uids_of(cli(*src, "--until", _plus_micro(t))[1]) == logs.sent[: k + 1]
    assert uids_of(cli(*src, "--since", t, "--until", t2)[1]) == logs.sent[k:k2]
    # The same instant written with an offset.
    local = t[:10] + "T" + t[11:19]
    shifted = time.strftime(
        "%Y-%m-%dT%H:%M:%S",
        time.gmtime(time.mktime(time.strptime(local, "%Y-%m-%dT%H:%M:%S")) - time.timezone + 3600),
    )
    assert uids_of(cli(*src, "--since", shifted + t[19:26] + "+01:00")[1]) == logs.sent[k:]


def test_durations(logs: Logs) -> None:
    src = (str(logs.a_log), str(logs.b_dir), "-o", "json")
    assert uids_of(cli(*src, "--since", "24h")[1]) == logs.sent
    code, out, err = cli(*src, "--until", "1h")
    assert (code, out, err) == (1, b"", "")


# --------------------------------------------------------------------- output forms


def _records(logs: Logs) -> list[dict[str, Any]]:
    return [json.loads(logs.raw[u]) for u in logs.sent]


def test_table(logs: Logs) -> None:
    code, out, err = cli(str(logs.a_log), str(logs.b_dir))
    assert code == 0, err
    text = out.decode()
    lines = text.splitlines()
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]
    assert lines[0].split() == ["TIME", "REASON", "NAMESPACE/POD", "CONTAINER"]
    recs = _records(logs)
    rows = sum(1 for r in recs for c in r["containers"] if c["action"] in ("rewrite", "warn"))
    rows += sum(1 for r in recs if r["decision"] == "error")
    row_lines = [x for x in lines if re.match(r"\d\d:\d\d:\d\d  ", x)]
    assert len(row_lines) == rows
    assert (
        "  amazon-k8s-cni:v1.19.2-eksbuild.1\n"
        "  602401143452.dkr.ecr.ap-southeast-4 → 491585149902.dkr.ecr.ap-southeast-4\n"
    ) in text
    assert "  (dry run: the pod was not created)" in text
    assert "kube-system/aws-node-*" in text and "team-a/tool" in text
    assert f"{len(recs)} records matched" in text


def test_table_of_errors(logs: Logs) -> None:
    code, out, _ = cli(str(logs.a_log), str(logs.b_dir), "--decision", "error")
    assert code == 0
    text = out.decode().replace("\n  ", " ")  # unfold long texts
    assert text.count("RuntimeError: probe of 999999999999") == ROUNDS
    assert text.count("team-b/f") == ROUNDS


def test_summary_json_counts_what_was_logged(logs: Logs) -> None:
    code, out, err = cli(str(logs.a_log), str(logs.b_dir), "--summary", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    recs = _records(logs)
    assert doc["kind"] == "EcrWebhookAuditSummary" and doc["schemaVersion"] == "v1"
    assert doc["records"] == len(recs)
    assert doc["dryRun"] == sum(r["dryRun"] for r in recs)
    assert doc["decisions"] == dict(Counter(r["decision"] for r in recs))
    assert doc["namespaces"] == dict(Counter(r["objectRef"]["namespace"] for r in recs))
    rewrites = [c for r in recs for c in r["containers"] if c["action"] == "rewrite"]
    routes = Counter((c["from"].split("/")[0], c["to"].split("/")[0]) for c in rewrites)
    assert {(x["from"], x["to"]): x["containers"] for x in doc["routes"]} == routes
    top = routes[(SOURCE_REGISTRY, TARGET_REGISTRY)]
    assert doc["routes"][0] == {"from": SOURCE_REGISTRY, "to": TARGET_REGISTRY, "containers": top}
    assert doc["reasons"] == dict(Counter(c["reason"] for r in recs for c in r["containers"]))
    assert doc["errors"] == [{"error": f"RuntimeError: probe of {FLAKY} timed out",
                              "records": ROUNDS}]  # fmt: skip
    assert sum(w["records"] for w in doc["warnings"]) == sum(len(r["warnings"]) for r in recs)
    assert doc["span"]["first"] == recs[0]["requestReceivedTimestamp"]
    assert doc["span"]["last"] == recs[-1]["requestReceivedTimestamp"]
    assert doc["input"]["records"] == len(recs) and doc["input"]["corrupt"] == 0


def test_summary_text(logs: Logs) -> None:
    code, out, _ = cli(str(logs.a_log), str(logs.b_dir), "--summary")
    assert code == 0
    lines = out.decode().splitlines()
    assert all(len(x) <= 80 for x in lines)
    assert lines[0] == f"records: {len(logs.sent)} ({2 * ROUNDS} dry run)"
    text = "\n".join(lines)
    assert "602401143452.dkr.ecr.ap-southeast-4\n         → 491585149902.dkr.ecr.ap-southeast-4" \
        in text  # fmt: skip
    assert f"{ROUNDS:>7}  RuntimeError: probe of" in text


# --------------------------------------------------------------------- errors and damage


def test_usage_and_input_errors_exit_2_with_one_line(logs: Logs, tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file or directory"),
        ([str(logs.a_log), "--since", "yesterday"], "--since: 'yesterday' is neither"),
        ([str(logs.a_log), "--owner", "aws-node"], "--owner: 'aws-node' is not KIND/NAME"),
        ([], "no source"),
        ([str(logs.a_log), "--log-stream-prefix", "x"], "needs --cloudwatch-log-group"),
        ([str(logs.a_log), "--decision", "denied"], "'denied' is not one of"),
        ([str(logs.a_log), "--output", "yaml"], "'yaml' is not one of"),
        (["-", "-"], "stdin"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append(([str(tmp_path / "empty")], "no files in the directory"))
    for args, message in cases:
        code, out, err = cli(*args, stdin=b"")
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and out == b""


def test_no_match_exits_1(logs: Logs) -> None:
    code, out, err = cli(str(logs.a_log), "--namespace", "nowhere", "-o", "json")
    assert (code, out, err) == (1, b"", "")
    code, out, _ = cli(str(logs.a_log), "--namespace", "nowhere")
    assert code == 1 and out.decode().startswith("0 records matched")


def test_corrupt_input_is_counted_never_fatal(logs: Logs, tmp_path: Path) -> None:
    good = [logs.raw[u] for u in logs.sent if u[0] == "A"]
    damaged = [
        good[0][: len(good[0]) // 2],  # truncated (a crash mid-write, a full disk)
        good[1].replace(b'"kube-system"', b'"kube-\xff\xfesystem"'),  # not UTF-8
        good[2].replace(b'"schemaVersion":"v1"', b'"schemaVersion":"v2"'),  # a future schema
        good[3].replace(b'"decision":', b'"decision" ', 1),  # broken inside
    ]
    mixed = [b"plain text from something else", *damaged, *good]
    (tmp_path / "audit.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    cut = gzip.compress(b"\n".join(good) + b"\n")
    (tmp_path / "audit.jsonl.1.gz").write_bytes(cut[: len(cut) // 2])  # copied mid-write
    code, out, err = cli(str(tmp_path), "-o", "json")
    assert code == 0
    assert set(out.splitlines()) == set(good)
    # The cut gzip copy gave up its records up to the cut (the plain file has all).
    assert len(good) < len(out.splitlines()) < 2 * len(good)
    assert "note: 4 corrupt record line(s) skipped (2 truncated, 1 not UTF-8, 1 not JSON)" \
        in err  # fmt: skip
    assert "note: 1 record(s) of schemaVersion 'v2' skipped" in err
    assert f"{tmp_path}/audit.jsonl:2: truncated record" in err
    assert f"{tmp_path}/audit.jsonl:3: record is not valid UTF-8" in err
    assert "audit.jsonl.1.gz" in err and "cut short" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- CloudWatch Logs (moto)

GROUP = "/aws/containerinsights/demo/application"
PREFIX = "fluent-bit-kube.var.log.containers."


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto in server mode on a free loopback port; the environment to reach it."""
    exe = Path(sys.executable).with_name("moto_server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe if exe.exists() else shutil.which("moto_server")),
                                 "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL_LOGS=f"http://127.0.0.1:{port}", AWS_REGION=REGION,
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        yield env
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def logs_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("logs", endpoint_url=env["AWS_ENDPOINT_URL_LOGS"], region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


def fluent_bit(line: bytes, pod_name: str, stream: str) -> str:
    """A container line as Fluent Bit's cloudwatch_logs output sends it (Container
    Insights set-up: CRI parser, kubernetes filter, whole record as JSON)."""
    return json.dumps({
        "time": "2025-12-01T12:00:00.000000000Z", "stream": stream, "_p": "F",
        "log": line.decode(),
        "kubernetes": {"pod_name": pod_name, "namespace_name": "ecr-webhook",
                       "container_name": "webhook", "host": "ip-10-0-1-10.ec2.internal",
                       "labels": {"app.kubernetes.io/name": "ecr-webhook"}},
    })  # fmt: skip


@pytest.fixture(scope="module")
def cloudwatch(logs: Logs, moto: dict[str, str]) -> dict[str, str]:
    """The two replicas' pod logs shipped to one log group, one stream per pod,
    plus another application's stream."""
    client = logs_client(moto)
    client.create_log_group(logGroupName=GROUP)
    b_lines = [x for f in sorted(logs.b_dir.iterdir()) for x in read_lines(f)]
    pods = {
        "ecr-webhook-a": logs.a_log.read_bytes().splitlines(),
        "ecr-webhook-b": b_lines,
        "coredns-5d78c": [b'[INFO] plugin/reload: Running configuration SHA512 = 0aa1',
                          b"[INFO] 10.0.1.5:53 - 2 A IN example.com. udp"],
    }  # fmt: skip
    for name, lines in pods.items():
        stream = f"{PREFIX}{name}_ecr-webhook_webhook-0123abcd.log"
        client.create_log_stream(logGroupName=GROUP, logStreamName=stream)
        events = []
        for i, line in enumerate(lines):
            doc = json.loads(line) if line.startswith(b"{") else {}
            if "stageTimestamp" in doc:
                at = time.mktime(time.strptime(doc["stageTimestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
                ms = int((at - time.timezone) * 1000) + int(doc["stageTimestamp"][20:23]) + 3
            else:
                ms = int(doc.get("ts", time.time()) * 1000) + i
            out = "stdout" if "stageTimestamp" in doc else "stderr"
            events.append({"timestamp": ms, "message": fluent_bit(line, name, out)})
        events.sort(key=lambda e: e["timestamp"])
        client.put_log_events(logGroupName=GROUP, logStreamName=stream, logEvents=events)
    return moto


def test_cloudwatch_byte_for_byte_in_time_order(logs: Logs, cloudwatch: dict[str, str]) -> None:
    code, out, err = cli("--cloudwatch-log-group", GROUP, "-o", "json", env=cloudwatch)
    assert code == 0, err
    assert err == ""
    assert out.splitlines() == [logs.raw[u] for u in logs.sent]


def test_cloudwatch_stream_prefix_and_filters(logs: Logs, cloudwatch: dict[str, str]) -> None:
    code, out, err = cli("--cloudwatch-log-group", GROUP, "--log-stream-prefix",
                         f"{PREFIX}ecr-webhook-b", "-o", "json", "--decision", "error",
                         env=cloudwatch)  # fmt: skip
    assert code == 0, err
    assert uids_of(out) == logs.uids("flaky", replica="B")
    code, out, _ = cli("--cloudwatch-log-group", GROUP, "--log-stream-prefix",
                       f"{PREFIX}ecr-webhook-a", "--summary", "-o", "json",
                       env=cloudwatch)  # fmt: skip
    assert json.loads(out)["records"] == len(logs.sent) // 2


def test_cloudwatch_missing_group_exits_2(cloudwatch: dict[str, str]) -> None:
    code, out, err = cli("--cloudwatch-log-group", "/no/such/group", env=cloudwatch)
    assert code == 2 and out == b""
    assert "--cloudwatch-log-group /no/such/group: no such log group" in err


class Calls:
    """Counts FilterLogEvents calls and keeps their parameters and event counts."""

    def __init__(self, client: Any) -> None:
        self.params: list[dict[str, Any]] = []
        self.events: list[int] = []
        client.meta.events.register("provide-client-params.cloudwatch-logs.FilterLogEvents",
                                    self.on_params)  # fmt: skip
        client.meta.events.register("after-call.cloudwatch-logs.FilterLogEvents", self.on_reply)

    def on_params(self, params: dict[str, Any], **_: Any) -> None:
        self.params.append(dict(params))

    def on_reply(self, parsed: dict[str, Any], **_: Any) -> None:
        self.events.append(len(parsed.get("events", [])))


def test_cloudwatch_pagination(logs: Logs, cloudwatch: dict[str, str]) -> None:
    from webhook import auditread
    from webhook.core import auditquery

    client = logs_client(cloudwatch)
    calls = Calls(client)
    events = list(auditread.cloudwatch_events(GROUP, None, None, None, page_size=7,
                                              client=client))  # fmt: skip
    assert len(calls.params) > 5 and all(p["limit"] == 7 for p in calls.params)
    assert all(p["filterPattern"] == '"EcrWebhookAudit"' for p in calls.params)
    assert sum(calls.events) == len(events) == len(logs.sent)  # the pattern kept records only
    assert calls.params[1]["nextToken"]
    # End to end over the pages: every record, in time order.
    query = auditread.Query((), auditquery.build_filters(now=time.time()), output="json",
                            log_group=GROUP, page_size=7)  # fmt: skip
    out, err = io.BytesIO(), io.StringIO()
    old = dict(os.environ)
    os.environ.update(cloudwatch)
    try:
        assert auditread.run(query, out, err) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert out.getvalue().splitlines() == [logs.raw[u] for u in logs.sent]


def test_cloudwatch_time_bounds_are_pushed_down(logs: Logs, cloudwatch: dict[str, str]) -> None:
    from webhook import auditread
    from webhook.core import auditquery as q

    client = logs_client(cloudwatch)
    calls = Calls(client)
    t = json.loads(logs.raw[logs.sent[0]])["requestReceivedTimestamp"]
    since = q.parse_bound("2099-01-01T00:00:00Z", 0, "--since")
    assert list(auditread.cloudwatch_events(GROUP, None, since, None, client=client)) == []
    until = q.iso(q.epoch(t) - 3600)
    assert list(auditread.cloudwatch_events(GROUP, None, None, until, client=client)) == []
    # The service returned nothing: the bounds were applied there, not here.
    assert calls.events == [0, 0]
    assert calls.params[0]["startTime"] == 4070908800000 - 60_000
    assert calls.params[1]["endTime"] == int(q.epoch(until) * 1000) + 15 * 60_000
    assert "endTime" not in calls.params[0] and "startTime" not in calls.params[1]


def test_a_source_that_opens_but_cannot_be_read_is_one_line_exit_2() -> None:
    """Found in review: /proc/self/mem opens, and its first read (EIO) was a traceback."""
    code, out, err = cli("/proc/self/mem")
    assert code == 2 and out == b""
    assert err.strip() == "error: /proc/self/mem: cannot read: Input/output error"


def test_times_out_of_range_are_one_line_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, _, err = cli("--since", "99999999999999h", str(empty))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: --since: '99999999999999h' is out of the range")
