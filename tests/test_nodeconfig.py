"""``ecr-webhook node-config``: the sandbox (pause) image setting per node OS.

Every region row (of ../shared/ecr_accounts.csv when present, and always of the
package copy) and every OS must give the row's account and registry host, and
the output must parse.  The tests parse the documents themselves (``tomllib``,
PyYAML, ``shlex``) rather than trusting the module's own self-check.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from webhook.cli import main
from webhook.core import nodeconfig
from webhook.core.errors import ConfigError

OSES = ("bottlerocket", "al2", "al2023", "containerd")


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


PACKAGE_ROWS = _rows((resources.files("webhook") / "data" / "ecr_accounts.csv").read_text())


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["node-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def images_in(doc: dict[str, Any]) -> list[str]:
    """The sandbox images a rendered document sets, parsed independently."""
    text = doc["text"]
    if doc["format"] == "toml":
        data = tomllib.loads(text)
        found = [
            data.get("settings", {}).get("kubernetes", {}).get("pod-infra-container-image"),
            data.get("plugins", {}).get("io.containerd.grpc.v1.cri", {}).get("sandbox_image"),
            data.get("plugins", {})
            .get("io.containerd.cri.v1.images", {})
            .get("pinned_images", {})
            .get("sandbox"),
        ]
        return [f for f in found if f]
    if doc["format"] == "yaml":
        loaded = yaml.safe_load(text)
        assert loaded["apiVersion"] == "node.eks.aws/v1alpha1"
        assert loaded["kind"] == "NodeConfig"
        return images_in({"format": "toml", "text": loaded["spec"]["containerd"]["config"]})
    assert doc["format"] == "shell"
    (line,) = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    words = shlex.split(line)
    assert "/etc/eks/bootstrap.sh" in words
    flags = {words[i]: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    # What bootstrap.sh + get-ecr-uri.sh build: <account>.dkr.ecr.<region>.<domain>/eks/pause
    m = re.search(r"^# Resulting image: (\S+)$", text, re.M)
    assert m is not None
    account = flags["--pause-container-account"]
    assert m.group(1).startswith(f"{account}.dkr.ecr.")
    assert m.group(1).endswith(f"/eks/pause:{flags['--pause-container-version']}")
    return [m.group(1)]


def check_row(row: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    for os_name in OSES:
        code, out, err = run(["--os", os_name, "--region", row["region"], "-o", "json"], capsys)
        assert code == 0, (row["region"], os_name, err)
        rep = json.loads(out)
        assert rep["account"] == row["account"]
        assert rep["partition"] == row["partition"]
        assert rep["registry"] == row["registry_host"]
        assert rep["documents"]
        for doc in rep["documents"]:
            imgs = images_in(doc)
            assert imgs, doc["title"]
            for img in imgs:
                assert img.startswith(f"{row['registry_host']}/eks/pause:"), img
                assert img.split("/")[0].split(".")[0] == row["account"]


@pytest.mark.parametrize("row", PACKAGE_ROWS, ids=[r["region"] for r in PACKAGE_ROWS])
def test_every_package_region_every_os(
    row: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The package copy of the registry facts, which the suite always has."""
    check_row(row, capsys)


def test_every_shared_region_every_os(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10 'done when': every row of ../shared/ecr_accounts.csv, for each OS."""
    rows = _rows((shared_dir / "ecr_accounts.csv").read_text())
    assert len(rows) > 40
    for row in rows:
        check_row(row, capsys)


def test_seed_scenario_bottlerocket_eu_central_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--os", "bottlerocket", "--region", "eu-central-1"], capsys)
    assert code == 0
    data = tomllib.loads(out)
    assert data == {
        "settings": {
            "kubernetes": {
                "pod-infra-container-image": (
                    "602401143452.dkr.ecr.eu-central-1.amazonaws.com/eks/pause:3.1-eksbuild.1"
                )
            }
        }
    }
    # The releases that ignore the setting are named in the output.
    assert "1.21.0" in out
    assert "bottlerocket-os/bottlerocket#3940" in out


def test_text_output_of_every_os_parses_as_its_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--os", "containerd", "--region", "ap-southeast-4"], capsys)
    assert code == 0
    i = out.index("# ---- containerd 2.x")
    one, two = out[:i], out[i:]
    assert tomllib.loads(one)["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == (
        "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/eks/pause:3.5"
    )
    pinned = tomllib.loads(two)["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]
    assert pinned["sandbox"] == "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/eks/pause:3.5"
    code, out, _ = run(["--os", "al2023", "--region", "ap-southeast-4"], capsys)
    assert code == 0
    assert yaml.safe_load(out)["kind"] == "NodeConfig"


def test_pause_tag_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["--os", "al2", "--region", "us-gov-west-1", "--pause-tag", "3.10", "-o", "json"], capsys
    )
    assert code == 0
    rep = json.loads(out)
    assert (
        "--pause-container-account 013241004608 --pause-container-version 3.10"
        in (rep["documents"][0]["text"])
    )


@pytest.mark.parametrize("os_name", OSES)
def test_mirror_replaces_the_registry(os_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = "111122223333.dkr.ecr.eu-central-1.amazonaws.com/eks-mirror"
    code, out, err = run(
        ["--os", os_name, "--region", "eu-central-1", "--mirror", mirror, "-o", "json"], capsys
    )
    assert code == 0, err
    rep = json.loads(out)
    want = f"{mirror}/eks/pause:{nodeconfig.DEFAULT_PAUSE_TAGS[os_name]}"
    assert rep["image"] == want
    assert rep["account"] == "111122223333"
    for doc in rep["documents"]:
        if doc["format"] == "shell":
            assert f"PAUSE_CONTAINER_IMAGE={mirror}/eks/pause " in doc["text"]
            assert "--pause-container-account" not in doc["text"]
        else:
            assert images_in(doc) == [want]


def test_mirror_serves_a_region_the_data_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["--os", "containerd", "--region", "xx-new-1", "--mirror", "harbor.example.com:8443"],
        capsys,
    )
    assert code == 0
    assert 'sandbox_image = "harbor.example.com:8443/eks/pause:3.5"' in out


def test_unknown_region_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--os", "bottlerocket", "--region", "eu-atlantis-9"], capsys)
    assert code == 2
    assert out == ""
    assert "'eu-atlantis-9'" in err and "--mirror" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--pause-tag", "3.5 ; rm -rf /"], "--pause-tag"),
        (["--mirror", "not a host"], "--mirror"),
        (["--mirror", "registry.example.com/UPPER"], "prefix"),
        (["--os", "windows"], "--os"),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"--os": "al2", "--region": "eu-central-1"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    code, _, err = run([x for kv in base.items() for x in kv], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_self_check_rejects_a_document_that_says_something_else() -> None:
    cfg = nodeconfig.render("containerd", "eu-central-1")
    bad_doc = nodeconfig.Document("x", "toml", "", cfg.documents[0].text.replace("3.5", "3.6"))
    with pytest.raises(ConfigError, match="expected"):
        nodeconfig.check(
            nodeconfig.NodeConfig(**{**nodeconfig._fields(cfg), "documents": (bad_doc,)})
        )
    broken = nodeconfig.Document("y", "yaml", "", "apiVersion: v1\nkind: Pod\n")
    with pytest.raises(ConfigError, match="does not parse"):
        nodeconfig.check(
            nodeconfig.NodeConfig(**{**nodeconfig._fields(cfg), "documents": (broken,)})
        )


def test_default_tags_follow_the_corpus(shared_dir: Path) -> None:
    """The Bottlerocket default is the tag Bottlerocket (before 1.21.0) generated; the
    EKS AMI default is the tag the AMI documentation pulls (corpus inventory)."""
    corpus = shared_dir / "corpus"
    toml = (
        corpus
        / "bottlerocket"
        / "bottlerocket-v1.20.0__sources__models__shared-defaults__kubernetes-aws.toml"
    ).read_text()
    m = re.search(r"/eks/pause:([\w.-]+)'", toml)
    assert m is not None
    assert nodeconfig.DEFAULT_PAUSE_TAGS["bottlerocket"] == m.group(1)
    inventory = (corpus / "images_inventory.tsv").read_text()
    ami = re.findall(r"^eks-ami/\S+\t\S+/eks/pause:([\w.-]+)$", inventory, re.M)
    assert ami and all(nodeconfig.DEFAULT_PAUSE_TAGS[o] == ami[0] for o in ("al2", "al2023"))
