"""The pure query core: time flags, the byte pre-filter, envelopes, rendering.

Records here come from the project's own ``build_record`` over real ``admit``
outcomes and are encoded by ``webhook.auditlog.encode``, exactly as the server
writes them.  tests/test_audit_cli.py runs the command over logs written by the
real server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.auditlog import encode
from webhook.core import auditquery as q
from webhook.core.audit import build_record
from webhook.core.errors import ConfigError
from webhook.core.plan import PlanContext
from webhook.core.policy import Policy
from webhook.core.review import admit, fail_open

CTX = PlanContext.build(Policy(), "ap-southeast-4")
BAD = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
GOOD = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"
NOW = 1_764_590_400.0  # 2025-12-01T12:00:00Z


def body(ns: str = "kube-system", images: tuple[str, ...] = (f"{BAD}/eks/pause:3.10",),
         user: str = "system:serviceaccount:kube-system:daemon-set-controller",
         owner: tuple[str, str] | None = ("DaemonSet", "aws-node"), dry_run: bool = False,
         uid: str = "u1") -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"generateName": "p-"}
    if owner:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True}]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "operation": "CREATE", "namespace": ns, "dryRun": dry_run,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "userInfo": {"username": user, "groups": ["system:authenticated"]},
        "object": {"metadata": meta, "spec": {"containers": [
            {"name": f"c{i}", "image": im} for i, im in enumerate(images)]}}}}  # fmt: skip


def line(at: float = NOW, **kw: Any) -> bytes:
    """One record as the server writes it, without the newline."""
    return encode(build_record(admit(body(**kw), CTX), at, at + 0.001)).rstrip(b"\n")


def scan_all(lines: list[bytes], **filters: Any) -> tuple[list[q.Hit], q.Scanner]:
    sc = q.Scanner(q.build_filters(now=NOW, **filters))
    hits = [r for r in map(sc.scan, lines) if isinstance(r, q.Hit)]
    return hits, sc


# --------------------------------------------------------------------- times


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("2h", 7200), ("1h30m", 5400), ("7d", 7 * 86400), ("2w", 14 * 86400),
    ("500ms", 0.5), ("1.5h", 5400),
])  # fmt: skip
def test_durations_count_back_from_now(text: str, seconds: float) -> None:
    assert q.parse_time(text, NOW) == pytest.approx(NOW - seconds)


@pytest.mark.parametrize(("text", "iso"), [
    ("2025-12-01T12:00:00Z", "2025-12-01T12:00:00.000000Z"),
    ("2025-12-01t12:00:00z", "2025-12-01T12:00:00.000000Z"),
    ("2025-12-01 14:00:00+02:00", "2025-12-01T12:00:00.000000Z"),
    ("2025-12-01T12:00:00.123456789Z", "2025-12-01T12:00:00.123456Z"),
    ("2025-12-01T11:59:59.5-00:00", "2025-12-01T11:59:59.500000Z"),
])  # fmt: skip
def test_rfc3339_times(text: str, iso: str) -> None:
    assert q.iso(q.parse_time(text, 0)) == iso


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "yesterday", "2025-12-01T12:00:00",
                                  "2025-12-01", "-2h", "2h junk"])  # fmt: skip
def test_bad_times_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--until") as exc:
        q.parse_time(text, NOW, "--until")
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("text", ["99999999999999h", "0001-01-01T00:00:00+01:00",
                                  "9999-12-31T23:59:59-01:00"])  # fmt: skip
def test_times_out_of_range_are_config_errors_not_tracebacks(text: str) -> None:
    """Found in review: gmtime and datetime overflowed with a traceback."""
    with pytest.raises(ConfigError, match=r"--since.*out of the range") as exc:
        q.parse_bound(text, NOW, "--since")
    assert exc.value.exit_code == 2


def test_iso_matches_the_writer() -> None:
    from webhook.core.audit import _iso

    for ts in (0.0, NOW, NOW + 0.123456, 1.9999996, NOW + 0.5):
        assert q.iso(ts) == _iso(ts)
    assert q.parse_bound("2025-12-01T12:00:00.000001Z", 0, "--since") == (
        "2025-12-01T12:00:00.000001Z"
    )


def test_bad_flag_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="KIND/NAME"):
        q.build_filters(now=NOW, owners=["aws-node"])
    with pytest.raises(ConfigError, match="must be before"):
        q.build_filters(now=NOW, since="1h", until="2h")
    with pytest.raises(ConfigError, match="--decision"):
        q.build_filters(now=NOW, decisions=["denied"])


# --------------------------------------------------------------------- filters


def test_time_bounds_are_half_open_at_the_microsecond() -> None:
    rec = line(at=NOW)
    ts = "2025-12-01T12:00:00.000000Z"
    assert len(scan_all([rec], since=ts)[0]) == 1
    assert len(scan_all([rec], until=ts)[0]) == 0
    assert len(scan_all([rec], since="2025-12-01T12:00:00.000001Z")[0]) == 0
    assert len(scan_all([rec], until="2025-12-01T12:00:00.000001Z")[0]) == 1


def test_each_filter_selects() -> None:
    lines = [
        line(uid="a"),
        line(uid="b", ns="team-a", owner=None, user="alice",
             images=(f"{BAD}/eks/coredns:v1", "nginx")),
        line(uid="c", dry_run=True, owner=("ReplicaSet", "web-1")),
        line(uid="d", images=(f"{GOOD}/eks/pause:3.10",)),
        encode(build_record(fail_open(body(uid="e", ns="team-b"), RuntimeError("boom")),
                            NOW, NOW)),
    ]  # fmt: skip

    def ids(**f: Any) -> list[str]:
        return [h.record["auditID"] for h in scan_all(lines, **f)[0]]

    assert ids() == ["a", "b", "c", "d", "e"]
    assert ids(namespaces=["team-a", "team-b"]) == ["b", "e"]
    assert ids(decisions=["error"]) == ["e"]
    assert ids(decisions=["unchanged"]) == ["d"]
    assert ids(users=["alice"]) == ["b"]
    assert ids(owners=["daemonset/aws-node"]) == ["a", "d", "e"]
    assert ids(owners=["ReplicaSet/web-1", "DaemonSet/nope"]) == ["c"]
    assert ids(dry_run=True) == ["c"]
    assert ids(dry_run=False) == ["a", "b", "d", "e"]
    assert ids(reasons=["at-target"]) == ["d"]
    assert ids(images=["*coredns*"]) == ["b"]
    assert ids(images=[f"{GOOD}/eks/coredns:*"]) == ["b"]  # the "to" image
    assert ids(images=["nginx"]) == ["b"]
    assert ids(images=["*"], namespaces=["kube-system"], reasons=["wrong-account"]) == ["a", "c"]


def test_container_filters_select_containers() -> None:
    rec = line(images=(f"{BAD}/eks/coredns:v1", f"{BAD}/eks/pause:3.10", "nginx"))
    (hit,), _ = scan_all([rec], images=["*pause*"])
    assert [c["container"] for c in hit.containers] == ["c1"]
    (hit,), _ = scan_all([rec])
    assert len(hit.containers) == 3


records = st.builds(
    lambda ns, img, user, dry, owner, err, at: (
        encode(build_record(fail_open(body(ns=ns), RuntimeError("x")), at, at))
        if err
        else line(at=at, ns=ns, images=img, user=user, dry_run=dry, owner=owner)
    ),
    st.sampled_from(["kube-system", "team-a", "a\u00e9b", 'q"uote']),
    st.lists(st.sampled_from([f"{BAD}/eks/pause:3.10", f"{GOOD}/eks/pause:3.10", "nginx",
                              f"{BAD}/EKS/bad", "x/y:z"]), min_size=0, max_size=3).map(tuple),
    st.sampled_from(["alice", "system:node:ip-10-0-0-1", "b\\ob"]),
    st.booleans(),
    st.sampled_from([None, ("DaemonSet", "aws-node"), ("ReplicaSet", 'w"eb')]),
    st.booleans(),
    st.floats(NOW - 7200, NOW + 7200),
)  # fmt: skip
filter_sets = st.fixed_dictionaries({}, optional={
    "namespaces": st.lists(st.sampled_from(["kube-system", "team-a", "a\u00e9b", 'q"uote']),
                           min_size=1, max_size=2),
    "decisions": st.lists(st.sampled_from(q.DECISIONS), min_size=1, max_size=2),
    "users": st.lists(st.sampled_from(["alice", "b\\ob"]), min_size=1, max_size=1),
    "owners": st.lists(st.sampled_from(["DaemonSet/aws-node", 'replicaset/w"eb']),
                       min_size=1, max_size=2),
    "dry_run": st.booleans(),
    "reasons": st.lists(st.sampled_from(["wrong-account", "at-target", "invalid-reference",
                                         "not-managed"]), min_size=1, max_size=2),
    "images": st.lists(st.sampled_from(["*pause*", "nginx", f"{GOOD}/*", "*", "x/[xy]:?"]),
                       min_size=1, max_size=2),
    "since": st.sampled_from(["2025-12-01T11:00:00Z", "2025-12-01T12:00:00.000001Z"]),
    "until": st.sampled_from(["2025-12-01T13:00:00Z", "2025-12-01T12:30:00Z"]),
})  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(recs=st.lists(records, min_size=1, max_size=6), filters=filter_sets)
def test_prefilter_never_drops_a_match(recs: list[bytes], filters: dict[str, Any]) -> None:
    """The byte pre-filter agrees with the exact check on every record: it may
    let a non-match through (the exact check drops it), never drop a match."""
    f = q.build_filters(now=NOW, **filters)
    hits, _ = scan_all(recs, **filters)
    expected = [r.rstrip(b"\n") for r in recs if q.select(json.loads(r), f) is not None]
    assert [h.raw for h in hits] == expected
    # The block scanner decides exactly as the line scanner, damage included.
    lines = [
        *recs,
        recs[0][:40],
        recs[-1].replace(b'"v1"', b'"v9"'),
        b"noise",
        recs[0].replace(b"CREATE", b"CR\xc3\x89ATE"),
        recs[0].replace(b"CREATE", b"\xff"),
    ]
    block = q.Scanner(f)
    by_line = q.Scanner(f)
    got = block.scan_lines(lines)
    want = [(i, r) for i, r in enumerate(map(by_line.scan, lines)) if r is not None]
    assert got == want
    assert block.counts == by_line.counts
    whole = q.Scanner(f)  # with the block-wide shortcuts
    assert whole.scan_lines(lines, b"\n".join(lines)) == want
    assert whole.counts == by_line.counts


# --------------------------------------------------------------------- shapes and damage


def test_shapes_of_the_same_record() -> None:
    rec = line()
    shapes = [
        rec + b"\n",
        rec + b"\r\n",
        b"2025-12-01T12:00:00.001234567Z stdout F " + rec + b"\n",  # containerd CRI file
        b"[pod/ecr-webhook-7d9f/webhook] " + rec,  # kubectl logs --prefix
        json.dumps({"log": rec.decode() + "\n", "stream": "stdout",
                    "kubernetes": {"namespace_name": "ecr-webhook"}}).encode(),  # Fluent Bit
        json.dumps({"message": rec.decode()}).encode(),  # CloudWatch agent, Vector
        json.dumps({"log": "x", "log_processed": json.loads(rec)}).encode(),  # Merge_Log
        json.dumps(json.loads(rec), indent=None).encode(),  # re-encoded with spaces
    ]  # fmt: skip
    hits, sc = scan_all(shapes, namespaces=["kube-system"])
    # Byte for byte as logged: the record's own text wherever it is carried;
    # re-encoded only when the shipper kept nothing but the parsed object.
    assert [h.raw for h in hits] == [rec] * (len(shapes) - 1) + [shapes[-1]]
    assert sc.counts.records == len(shapes) and sc.counts.corrupt == 0


def test_lines_that_are_not_records_are_skipped_silently() -> None:
    noise = [b"", b"\n", b"plain text\n", b'{"ts":1.5,"v":0,"msg":"serving"}\n',
             b'{"ts":1.5,"msg":"x","err":"EcrWebhookAudit not written"}\n', b"\xff\xfe\n",
             json.dumps({"log": "GET /healthz 200"}).encode()]  # fmt: skip
    hits, sc = scan_all(noise)
    assert hits == [] and sc.counts.records == 0 and sc.counts.corrupt == 0


def test_damage_is_counted_and_named() -> None:
    rec = line()
    v2 = rec.replace(b'"schemaVersion":"v1"', b'"schemaVersion":"v2"')
    bad_utf8 = rec.replace(b'"kube-system"', b'"kube-\xffsystem"')
    inner_broken = rec.replace(b'"decision":', b'"decision"', 1)
    wrapped_cut = json.dumps({"log": rec[:200].decode()}).encode()
    lines = [rec[:300] + b"\n", bad_utf8, v2, inner_broken, wrapped_cut, rec]
    sc = q.Scanner(q.build_filters(now=NOW))
    results = [sc.scan(x) for x in lines]
    assert results[:5] == [q.TRUNCATED, q.INVALID_UTF8, q.other_schema_note("v2"),
                           q.INVALID_JSON, q.TRUNCATED]  # fmt: skip
    assert isinstance(results[5], q.Hit)
    c = sc.counts
    assert (c.records, c.truncated, c.invalid_utf8, c.invalid_json) == (6, 2, 1, 1)
    assert dict(c.other_schema) == {"v2": 1}
    notes = q.corrupt_note(c)
    assert "4 corrupt" in notes[0] and "'v2'" in notes[1]


def test_unknown_extra_fields_are_tolerated() -> None:
    rec = json.loads(line())
    for c in rec["containers"]:
        c["probes"] = [{"registry": GOOD, "result": "available", "namespace": "team-a"}]
    rec["future"] = {"decision": "error"}
    raw = encode(rec).rstrip(b"\n")
    hits, _ = scan_all([raw], namespaces=["kube-system"], decisions=["patched"])
    assert [h.raw for h in hits] == [raw]
    assert scan_all([raw], namespaces=["team-a"])[0] == []


# --------------------------------------------------------------------- rendering


def test_short_image_drops_only_an_ecr_domain() -> None:
    assert q.short_image(f"{BAD}/eks/pause:3.10") == (
        "602401143452.dkr.ecr.ap-southeast-4/eks/pause:3.10"
    )
    assert q.short_image("918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn/eks/pause:3") == (
        "918309763551.dkr.ecr.cn-north-1/eks/pause:3"
    )
    assert q.short_image("602401143452.dkr-ecr.us-west-2.on.aws/x") == (
        "602401143452.dkr-ecr.us-west-2/x"
    )
    for keep in ("harbor.example.com/eks/pause:3.10", "nginx", f"{BAD}x/y"):
        assert q.short_image(keep) == keep


def test_table_fits_80_columns_and_shows_each_rewrite() -> None:
    long_ns = "a-very-long-namespace-name-for-a-team"
    recs = [
        line(images=(f"{BAD}/amazon/aws-network-policy-agent:v1.1.6-eksbuild.1-and-more-tag",
                     f"{BAD}/eks/pause:3.10", "nginx")),
        line(ns=long_ns, images=(f"{BAD}/EKS/Bad:1",)),
        encode(build_record(fail_open(body(), RuntimeError("probe " + "x" * 120)), NOW, NOW)),
    ]  # fmt: skip
    hits, _ = scan_all(recs)
    t = q.TableRenderer(by_container=False)
    out = [x for h in hits for x in t.render(h)]
    assert out[0] == q.TABLE_HEADER and out[1] == "# 2025-12-01 (UTC)"
    assert all(len(x) <= q.WIDTH for x in out), [x for x in out if len(x) > q.WIDTH]
    assert t.rows == 4  # two rewrites, one warning, one error
    text = "\n".join(out)
    assert (
        "\n  eks/pause:3.10\n  602401143452.dkr.ecr.ap-southeast-4 → 491585149902.dkr.ecr."
        "ap-southeast-4\n" in text
    )
    assert "invalid-reference" in text and "nginx" not in text
    assert "x" * 60 in text.replace("\n  ", "")  # folded, not cut


def test_summary_counts() -> None:
    recs = [
        line(images=(f"{BAD}/eks/pause:3.10", f"{BAD}/eks/coredns:1")),
        line(ns="team-a", images=(f"{BAD}/eks/pause:3.10",), dry_run=True),
        line(images=(f"{GOOD}/eks/pause:3.10",), at=NOW + 60),
        encode(build_record(fail_open(body(), RuntimeError("boom")), NOW - 60, NOW)),
    ]
    s = q.Summary()
    for h in scan_all(recs)[0]:
        s.add(h)
    doc = s.as_json()
    assert doc["records"] == 4 and doc["dryRun"] == 1
    assert doc["decisions"] == {"patched": 2, "unchanged": 1, "error": 1}
    assert doc["namespaces"] == {"kube-system": 3, "team-a": 1}
    assert doc["routes"] == [{"from": BAD, "to": GOOD, "containers": 3}]
    assert doc["images"][0] == {"image": f"{BAD}/eks/pause:3.10", "containers": 2}
    assert doc["errors"] == [{"error": "RuntimeError: boom", "records": 1}]
    assert doc["span"] == {"first": "2025-12-01T11:59:00.000000Z",
                           "last": "2025-12-01T12:01:00.000000Z"}  # fmt: skip
    text = q.render_summary(s)
    assert all(len(x) <= q.WIDTH for x in text)
    assert "      3  602401143452.dkr.ecr.ap-southeast-4" in text
    assert "         → 491585149902.dkr.ecr.ap-southeast-4" in text


def test_non_ascii_values_match_in_both_spellings() -> None:
    """The server writes UTF-8 (orjson); earlier records escape non-ASCII as ``\\u``.

    A user name with an accent is found in either spelling.  (Found by the
    hypothesis test above once the writer moved to orjson: the pre-filter only
    knew the escaped spelling and dropped the match.)
    """
    utf8 = line(user="josé")
    assert "josé".encode() in utf8
    escaped = json.dumps(json.loads(utf8), separators=(",", ":")).encode()
    assert b"jos\\u00e9" in escaped
    for raw in (utf8, escaped):
        hits, _ = scan_all([raw], users=("josé",))
        assert [h.record["user"]["username"] for h in hits] == ["josé"]
    hits, _ = scan_all([utf8, escaped], users=("jose",))
    assert hits == []
