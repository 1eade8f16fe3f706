"""``ecr-webhook dry-run`` end to end through ``main(argv)``: inputs, kinds,
outputs, the JSON report contract, and errors that name file and document."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from webhook import dryrun
from webhook.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
A4 = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
A4_OK = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, _ = run([*argv, "--output", "json"], capsys)
    assert code == 0
    return json.loads(out)  # type: ignore[no-any-return]


def test_done_when_ap_southeast_4(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 2 'done when': three rewrites to 491585149902."""
    rep = report(
        ["--region", "ap-southeast-4", "-f", str(EXAMPLES / "aws-node-ap-southeast-4.yaml")], capsys
    )
    (obj,) = rep["objects"]
    assert (obj["kind"], obj["namespace"], obj["name"]) == ("DaemonSet", "kube-system", "aws-node")
    assert obj["source"].endswith("aws-node-ap-southeast-4.yaml")
    assert [r["to"].split("/")[0] for r in obj["rewrites"]] == [A4_OK] * 3
    assert {r["reason"] for r in obj["rewrites"]} == {"wrong-account"}
    assert [r["path"] for r in obj["rewrites"]] == [
        "/spec/template/spec/initContainers/0/image",
        "/spec/template/spec/containers/0/image",
        "/spec/template/spec/containers/1/image",
    ]
    for r in obj["rewrites"]:
        assert r["from"].replace(A4, A4_OK) == r["to"]
        assert set(r) == {"container", "path", "from", "to", "reason"}
    assert obj["warnings"] == []


def test_untouched_images(capsys: pytest.CaptureFixture[str]) -> None:
    rep = report(["--region", "eu-central-1", "-f", str(EXAMPLES / "untouched.yaml")], capsys)
    assert len(rep["objects"]) == 2
    assert all(o["rewrites"] == [] for o in rep["objects"])


def test_region_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "af-south-1")
    rep = report(["-f", str(EXAMPLES / "pause-pod-af-south-1.yaml")], capsys)
    assert rep["region"] == "af-south-1"
    assert rep["objects"][0]["rewrites"][0]["to"].startswith("877085696533.")


def test_policy_file_region(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    pol = tmp_path / "policy.yaml"
    pol.write_text("region: cn-north-1\n")
    rep = report(
        ["--policy", str(pol), "-f", str(EXAMPLES / "cni-commercial-in-china.yaml")], capsys
    )
    assert {r["to"].split("/")[0] for r in rep["objects"][0]["rewrites"]} == {
        "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn"
    }


def _pod(name: str, image: str, ns: str = "kube-system") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "c", "image": image}]},
    }


def test_all_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tpl = {"metadata": {}, "spec": {"containers": [{"name": "c", "image": f"{A4}/eks/pause:3.10"}]}}
    docs: list[dict[str, Any]] = [_pod("pod", f"{A4}/eks/pause:3.10")]
    for kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": kind,
                "metadata": {"name": kind.lower()},
                "spec": {"template": tpl},
            }
        )
    docs.append(
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "cj"},
            "spec": {"jobTemplate": {"spec": {"template": tpl}}},
        }
    )
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [_pod("in-list-1", f"{A4}/eks/pause:3.10"), _pod("in-list-2", "nginx")],
        }
    )
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}})
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "operation": "CREATE",
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ns1",
            "object": _pod("ar", f"{A4}/eks/pause:3.10"),
        },
    }
    j = tmp_path / "review.json"
    j.write_text(json.dumps(review))
    rep = report(["--region", "ap-southeast-4", "-f", str(f), "-f", str(j)], capsys)
    kinds = [(o["kind"], o["name"], len(o["rewrites"])) for o in rep["objects"]]
    assert kinds == [
        ("Pod", "pod", 1),
        ("Deployment", "deployment", 1),
        ("DaemonSet", "daemonset", 1),
        ("StatefulSet", "statefulset", 1),
        ("ReplicaSet", "replicaset", 1),
        ("Job", "job", 1),
        ("CronJob", "cj", 1),
        ("Pod", "in-list-1", 1),
        ("Pod", "in-list-2", 0),
        ("Pod", "ar", 1),
    ]
    cron = rep["objects"][6]["rewrites"][0]
    assert cron["path"] == "/spec/jobTemplate/spec/template/spec/containers/0/image"


def test_directory_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO(yaml.safe_dump(_pod("stdin", f"{A4}/eks/pause:3.10")))
    )
    rep = report(["--region", "ap-southeast-4", "-f", str(EXAMPLES), "-f", "-"], capsys)
    sources = {o["source"] for o in rep["objects"]}
    assert "-" in sources and len(sources) == 5


def test_unreadable_document_is_named_and_others_still_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "mixed.yaml"
    f.write_text(
        yaml.safe_dump(_pod("good1", f"{A4}/eks/pause:3.10"))
        + "---\nkind: [unclosed\n"
        + "---\n- just\n- a list\n---\n"
        + yaml.safe_dump(_pod("good2", f"{A4}/eks/pause:3.10"))
    )
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "--output", "json"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [
        f"error: {f}: document 1: not valid YAML: " + lines[0].split("not valid YAML: ")[1],
        f"error: {f}: document 2: not a Kubernetes object (expected a mapping)",
    ]
    rep = json.loads(out)
    assert [o["name"] for o in rep["objects"]] == ["good1", "good2"]
    assert [e["index"] for e in rep["errors"]] == [1, 2]
    assert "Traceback" not in err


def test_missing_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["-f", "/nonexistent/x.yaml"], capsys)
    assert code == 2
    assert err.strip() == (
        "error: /nonexistent/x.yaml: no such file or directory; pass a manifest file, a dir or -"
    )


def test_bad_policy_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text("targets: [{type: region, region: atlantis-1}]\n")
    code, _, err = run(["--policy", str(pol), "-f", str(EXAMPLES)], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: {pol}: targets[0].region: not an AWS region name "
        "(e.g. us-west-2) (got 'atlantis-1')"
    )


def test_output_patch_applies(capsys: pytest.CaptureFixture[str]) -> None:
    src = EXAMPLES / "aws-node-ap-southeast-4.yaml"
    code, out, _ = run(["--region", "ap-southeast-4", "-f", str(src), "--output", "patch"], capsys)
    assert code == 0
    (line,) = out.strip().splitlines()
    patch = json.loads(line)["patch"]
    result = jsonpatch.JsonPatch(patch).apply(yaml.safe_load(src.read_text()))
    images = [c["image"] for c in result["spec"]["template"]["spec"]["containers"]]
    assert all(i.startswith(A4_OK) for i in images)


def test_output_yaml_is_rewritten_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        [
            "--region",
            "ap-southeast-4",
            "-f",
            str(EXAMPLES / "aws-node-ap-southeast-4.yaml"),
            "-f",
            str(EXAMPLES / "untouched.yaml"),
            "--output",
            "yaml",
        ],
        capsys,
    )
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 3
    rewritten = docs[0]["spec"]["template"]
    images = [c["image"] for k in ("initContainers", "containers") for c in rewritten["spec"][k]]
    assert len(images) == 3 and all(i.startswith(A4_OK + "/") for i in images)
    originals = json.loads(rewritten["metadata"]["annotations"]["ecr-webhook.io/original-images"])
    assert sorted(originals.values()) == sorted(i.replace(A4_OK, A4) for i in images)
    assert docs[2]["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"


def test_output_diff_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["--region", "ap-southeast-4", "-f", str(EXAMPLES / "aws-node-ap-southeast-4.yaml")], capsys
    )
    assert code == 0
    assert f"-        image: {A4}/amazon-k8s-cni:v1.19.4" in out
    assert f"+        image: {A4_OK}/amazon-k8s-cni:v1.19.4" in out
    assert out.rstrip().endswith("1 pod specs, 1 documents changed, 3 images rewritten")


def test_split_documents_keeps_block_scalars() -> None:
    text = "a: 1\n---\nb: |\n  x---y\n  --- not a separator? it is indented\n--- # comment\nc: 3\n"
    assert [yaml.safe_load(d) for d in dryrun.split_documents(text)] == [
        {"a": 1},
        {"b": "x---y\n--- not a separator? it is indented\n"},
        {"c": 3},
    ]


def test_console_script_help_is_fast_path() -> None:
    """``ecr-webhook --help`` must not import boto3, kubernetes, flask or gunicorn."""
    code = (
        "import sys; from webhook.cli import main; "
        "rc = main(['--help']); "
        "heavy = [m for m in ('boto3', 'kubernetes', 'flask', 'gunicorn', 'jsonpatch') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_admission_review_input_follows_the_servers_scope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = _pod("ar", f"{A4}/eks/pause:3.10")
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": f"{A4}/eks/pause:3.10"}]
    files = []
    for op, sub in (("DELETE", ""), ("UPDATE", "ephemeralcontainers"), ("CREATE", "")):
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": op,
                "operation": op,
                "subResource": sub,
                "object": pod,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
            },
        }
        f = tmp_path / f"{op}.json"
        f.write_text(json.dumps(review))
        files += ["-f", str(f)]
    code, out, _ = run(["--region", "ap-southeast-4", *files, "--output", "patch"], capsys)
    assert code == 0
    patches = {json.loads(line)["source"].rsplit("/", 1)[1]: json.loads(line)["patch"]
               for line in out.strip().splitlines()}  # fmt: skip
    assert "DELETE.json" not in patches  # out of scope: the server sends no patch
    assert [o["path"] for o in patches["UPDATE.json"]] == ["/spec/ephemeralContainers/0/image"]
    assert len(patches["CREATE.json"]) == 3  # two images and the annotation


def test_invalid_admission_review_is_a_document_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad-review.json"
    f.write_text(
        json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {"uid": "", "object": _pod("x", f"{A4}/eks/pause:3.10")},
            }
        )
    )
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "--output", "json"], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: {f}: document 0: not a valid AdmissionReview: request.uid is missing or empty"
    )
    assert json.loads(out)["objects"] == []
