"""``ecr-webhook dry-run`` input edges found by hand (issue 11): an unknown
cluster region, alias bombs, flow-mapping and concatenated-JSON streams, pipes
and character devices as files, file-level errors in the JSON report, and
JSON errors that say JSON."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from webhook import dryrun
from webhook.cli import main

A4 = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
A4_OK = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pod(name: str, image: str = f"{A4}/eks/pause:3.10") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "image": image}]}}  # fmt: skip


# --------------------------------------------------------------------- unknown region


@pytest.mark.parametrize("how", ["flag", "policy", "env"])
def test_unknown_region_warns_and_plans(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    f = tmp_path / "pods.yaml"
    f.write_text(yaml.safe_dump_all([
        pod("wrong-account"), pod("in-region", "602401143452.dkr.ecr.ap-southeast-9."
                                  "amazonaws.com/eks/pause:3.10")]))  # fmt: skip
    args = ["-f", str(f), "-o", "json"]
    if how == "flag":
        args += ["--region", "ap-southeast-9"]
    elif how == "policy":
        (tmp_path / "p.yaml").write_text("region: ap-southeast-9\n")
        args += ["--policy", str(tmp_path / "p.yaml")]
    else:
        monkeypatch.setenv("AWS_REGION", "ap-southeast-9")
    code, out, err = run(args, capsys)
    assert code == 0
    assert "warning: region ap-southeast-9 is not in the registry data" in err
    rep = json.loads(out)
    assert rep["region"] == "ap-southeast-9"
    first, second = rep["objects"]
    assert [r["to"] for r in first["rewrites"]] == [f"{A4_OK}/eks/pause:3.10"]
    assert second["rewrites"] == [] and second["warnings"] == []


def test_malformed_region_is_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--region", "moon-1", "-f", "/dev/null"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: command line: --region: not an AWS region name")


# --------------------------------------------------------------------- alias bombs

# 528 bytes: seven levels of nine aliases under a kind: List whose three pods
# each carry the 9**6-node tree and a wrong-account image (so -o diff rewrites).
BOMB = (
    "kind: List\n"
    "a: &a [x,x,x,x,x,x,x,x,x]\n"
    + "".join(
        f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]\n"
        for p, n in zip("abcdef", "bcdefg", strict=True)
    )
    + "items:\n"
    f"- {{kind: Pod, x: *g, spec: {{containers: [{{name: c, image: &i {A4}/eks/pause:3.10}}]}}}}\n"
    + "- {kind: Pod, x: *g, spec: {containers: [{name: c, image: *i}]}}\n"
    * 2
)
BOMB += "# " + "." * (528 - len(BOMB) - 3) + "\n"


@pytest.mark.parametrize("output", ["diff", "yaml", "json", "patch"])
def test_the_528_byte_alias_bomb_is_refused_not_expanded(
    output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11: ``-o diff`` spent 10-26 s walking 3 x 9**6 aliased nodes.

    The document is refused (as kubectl refuses it) without being walked as a
    tree; the other documents of the stream are still planned.
    """
    assert len(BOMB.encode()) == 528
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB + "---\n" + yaml.safe_dump(pod("after")))
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "-o", output], capsys)
    assert code == 2
    assert f"error: {f}: document 0: document contains excessive aliasing" in err
    if output == "json":
        rep = json.loads(out)
        assert [o["name"] for o in rep["objects"]] == ["after"]
        assert rep["errors"][0]["index"] == 0
    elif output == "diff":
        assert "1 pod specs, 1 documents changed, 1 images rewritten" in out


def test_moderate_aliases_are_still_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anchors for shared env lists are ordinary YAML; the rewrite keeps them working."""
    f = tmp_path / "ds.yaml"
    f.write_text(f"""apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: aws-node, namespace: kube-system}}
spec:
  template:
    metadata: {{labels: &labels {{app: aws-node}}}}
    spec:
      containers:
      - name: a
        image: {A4}/amazon-k8s-cni:v1.19.4
        env: &env [{{name: X, value: "1"}}, {{name: Y, value: "2"}}]
      - {{name: b, image: {A4}/amazon/aws-network-policy-agent:v1.1.6, env: *env}}
""")
    code, out, _ = run(["--region", "ap-southeast-4", "-f", str(f), "-o", "yaml"], capsys)
    assert code == 0
    doc = yaml.safe_load(out)
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert [c["image"].split("/")[0] for c in containers] == [A4_OK, A4_OK]
    assert containers[0]["env"] == containers[1]["env"] == [
        {"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]  # fmt: skip


# --------------------------------------------------------------------- stream forms


def test_a_stream_whose_first_document_is_a_flow_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "mixed.yaml"
    f.write_text(json.dumps(pod("flow")) + "\n---\n" + yaml.safe_dump(pod("block"))
                 + "---\n{kind: Pod, metadata: {name: yaml-flow}, spec: {containers: "
                 f"[{{name: c, image: '{A4}/eks/pause:3.10'}}]}}}}\n")  # fmt: skip
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "-o", "json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert [(o["name"], o["index"], len(o["rewrites"])) for o in rep["objects"]] == [
        ("flow", 0, 1), ("block", 1, 1), ("yaml-flow", 2, 1)]  # fmt: skip


@pytest.mark.parametrize("name", ["pods.json", "pods.yaml"])
def test_concatenated_json_objects(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``jq -c`` output, or several ``kubectl get -o json`` outputs in one file."""
    f = tmp_path / name
    f.write_text(json.dumps(pod("one")) + json.dumps(pod("two"))
                 + "\n" + json.dumps(pod("three"), indent=2) + "\n")  # fmt: skip
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "-o", "json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert [(o["name"], o["index"]) for o in rep["objects"]] == [("one", 0), ("two", 1),
                                                                  ("three", 2)]  # fmt: skip
    assert all(len(o["rewrites"]) == 1 for o in rep["objects"])


def test_a_json_error_says_json_and_keeps_the_documents_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "pods.json"
    f.write_text(json.dumps(pod("good")) + '\n{"kind": "Pod",}\n')
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(f), "-o", "json"], capsys)
    assert code == 2
    assert err == (f"error: {f}: document 1: not valid JSON: Expecting property name enclosed "
                   "in double quotes (line 2 column 16)\n")  # fmt: skip
    assert "YAML" not in err
    rep = json.loads(out)
    assert [o["name"] for o in rep["objects"]] == ["good"]
    assert rep["errors"] == [{"source": str(f), "index": 1, "error": err.split(": ", 3)[3][:-1]}]


# --------------------------------------------------------------------- pipes and devices


def _cli(script: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A real shell: process substitution and /dev/stdin are the shell's and the kernel's."""
    exe = Path(sys.executable).with_name("ecr-webhook")
    return subprocess.run(["bash", "-c", script.replace("ecr-webhook", str(exe))], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_process_substitution_dev_stdin_and_dev_null(tmp_path: Path) -> None:
    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(pod("p")))
    sub = _cli(f"ecr-webhook dry-run --region ap-southeast-4 -o json -f <(cat {f})")
    assert sub.returncode == 0, sub.stderr
    (obj,) = json.loads(sub.stdout)["objects"]
    assert obj["name"] == "p" and obj["source"].startswith("/dev/fd/")
    piped = _cli("ecr-webhook dry-run --region ap-southeast-4 -o json -f /dev/stdin",
                 stdin=f.read_text())  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert [o["name"] for o in json.loads(piped.stdout)["objects"]] == ["p"]
    null = _cli("ecr-webhook dry-run --region ap-southeast-4 -o json -f /dev/null")
    assert null.returncode == 0, null.stderr
    assert json.loads(null.stdout)["objects"] == [] and json.loads(null.stdout)["errors"] == []


# --------------------------------------------------------------------- the size of one input

LIMIT_LINE = (": not read: more than 64 MiB, the limit of one dry-run input; "
              "split it into several files\n")  # fmt: skip


@pytest.mark.parametrize("source", ["-f /dev/zero", "-f <(yes 'kind: Pod')", "-f - < /dev/zero"])
def test_an_endless_input_is_refused_at_the_limit(tmp_path: Path, source: str) -> None:
    """A device, a pipe that never ends and stdin: nothing to stat first, so the
    read stops one byte past the limit.  These inputs never end, so an answer at
    all shows the rest was not read; the other file is still planned."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(pod("good")))
    result = _cli(f"ecr-webhook dry-run --region ap-southeast-4 -o json {source} -f {good}")
    assert result.returncode == 2
    name = "-" if "-f -" in source else ("/dev/zero" if "zero" in source else "/dev/fd/")
    (line,) = result.stderr.splitlines(keepends=True)
    assert line.startswith(f"error: {name}") and line.endswith(LIMIT_LINE), line
    rep = json.loads(result.stdout)
    assert [o["name"] for o in rep["objects"]] == ["good"]
    (error,) = rep["errors"]
    assert error["index"] is None and error["error"] == LIMIT_LINE[2:-1]


def test_the_limit_is_inclusive_for_files_and_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input of exactly the limit is planned; one byte (or character) more is
    refused.  The limit is lowered to the size of one small pod document."""
    text = yaml.safe_dump(pod("p"))
    monkeypatch.setattr(dryrun, "MAX_INPUT_BYTES", len(text.encode()))
    f = tmp_path / "pod.yaml"
    f.write_text(text)
    code, out, err = run(["--region", "ap-southeast-4", "-o", "json", "-f", str(f)], capsys)
    assert code == 0 and err == "" and len(json.loads(out)["objects"]) == 1
    f.write_text(text + "\n")
    code, out, err = run(["--region", "ap-southeast-4", "-o", "json", "-f", str(f)], capsys)
    assert code == 2 and "not read: more than 0 MiB" in err
    assert json.loads(out)["objects"] == []
    for stdin, planned in ((text, 1), (text + "#", 0)):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code, out, err = run(["--region", "ap-southeast-4", "-o", "json", "-f", "-"], capsys)
        assert (code, len(json.loads(out)["objects"])) == (2 - 2 * planned, planned), err


def test_crlf_line_ends_still_split_into_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Windows line ends: ``---\r\n`` separates documents as text-mode reading did,
    so a bad document in the middle is named and the others are planned."""
    f = tmp_path / "crlf.yaml"
    docs = [yaml.safe_dump(pod("a")), "metadata: {name: [unclosed\n", yaml.safe_dump(pod("b"))]
    f.write_bytes("---\n".join(docs).replace("\n", "\r\n").encode())
    code, out, err = run(["--region", "ap-southeast-4", "-o", "json", "-f", str(f)], capsys)
    assert code == 2 and err.startswith(f"error: {f}: document 1:")
    rep = json.loads(out)
    assert [o["name"] for o in rep["objects"]] == ["a", "b"]
    assert [e["index"] for e in rep["errors"]] == [1]


def test_file_level_errors_are_in_the_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("metadata: {name: caf\xe9}\n".encode("latin-1"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(pod("good")))
    code, out, err = run(["--region", "ap-southeast-4", "-f", str(bad), "-f", str(good),
                          "-o", "json"], capsys)  # fmt: skip
    assert code == 2
    assert err == f"error: {bad}: cannot read: not UTF-8 text\n"
    rep = json.loads(out)
    assert rep["errors"] == [{"source": str(bad), "index": None,
                              "error": "cannot read: not UTF-8 text"}]  # fmt: skip
    assert [o["name"] for o in rep["objects"]] == ["good"]
