"""The ECR registry model: host parsing, partitions, official hosts, and the
shipped registry facts (compared with ../shared when it is present)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from webhook.core import ecr

DATA = Path(ecr.__file__).parent.parent / "data"


@pytest.mark.parametrize(
    ("host", "account", "region", "fips", "dualstack", "partition"),
    [
        (
            "602401143452.dkr.ecr.us-west-2.amazonaws.com",
            "602401143452",
            "us-west-2",
            False,
            False,
            "aws",
        ),
        (
            "602401143452.dkr.ecr-fips.us-east-1.amazonaws.com",
            "602401143452",
            "us-east-1",
            True,
            False,
            "aws",
        ),
        (
            "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn",
            "918309763551",
            "cn-north-1",
            False,
            False,
            "aws-cn",
        ),
        (
            "013241004608.dkr.ecr.us-gov-west-1.amazonaws.com",
            "013241004608",
            "us-gov-west-1",
            False,
            False,
            "aws-us-gov",
        ),
        (
            "877088126301.dkr.ecr.eusc-de-east-1.amazonaws.eu",
            "877088126301",
            "eusc-de-east-1",
            False,
            False,
            "aws-eusc",
        ),
        (
            "725322719131.dkr.ecr.us-iso-east-1.c2s.ic.gov",
            "725322719131",
            "us-iso-east-1",
            False,
            False,
            "aws-iso",
        ),
        (
            "187977181151.dkr.ecr.us-isob-east-1.sc2s.sgov.gov",
            "187977181151",
            "us-isob-east-1",
            False,
            False,
            "aws-iso-b",
        ),
        (
            "249663109785.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk",
            "249663109785",
            "eu-isoe-west-1",
            False,
            False,
            "aws-iso-e",
        ),
        (
            "171035529773.dkr.ecr.us-isof-east-1.csp.hci.ic.gov",
            "171035529773",
            "us-isof-east-1",
            False,
            False,
            "aws-iso-f",
        ),
        (
            "491585149902.dkr-ecr.ap-southeast-4.on.aws",
            "491585149902",
            "ap-southeast-4",
            False,
            True,
            "aws",
        ),
        (
            "602401143452.dkr-ecr-fips.us-east-1.on.aws",
            "602401143452",
            "us-east-1",
            True,
            True,
            "aws",
        ),
        (
            "602401143452.DKR.ECR.US-WEST-2.AMAZONAWS.COM",
            "602401143452",
            "us-west-2",
            False,
            False,
            "aws",
        ),
    ],
)
def test_parse_host(
    host: str, account: str, region: str, fips: bool, dualstack: bool, partition: str
) -> None:
    h = ecr.parse_host(host)
    assert h is not None
    assert (h.account, h.region, h.fips, h.dualstack, h.partition) == (
        account,
        region,
        fips,
        dualstack,
        partition,
    )
    assert h.consistent
    assert h.host == host.lower()


@pytest.mark.parametrize(
    "host",
    [
        "quay.io",
        "602401143452.dkr.ecr.us-west-2.amazonaws.com.evil.example",
        "60240114345.dkr.ecr.us-west-2.amazonaws.com",
        "public.ecr.aws",
        None,
        "",
        "602401143452.dkr.ecr.us-west-2.example.com",
    ],
)
def test_not_ecr(host: str | None) -> None:
    assert ecr.parse_host(host) is None


def test_inconsistent_suffix_is_parsed_but_flagged() -> None:
    h = ecr.parse_host("918309763551.dkr.ecr.cn-north-1.amazonaws.com")
    assert h is not None and h.partition == "aws-cn" and not h.consistent


def test_official_hosts() -> None:
    facts = ecr.default_facts()
    assert (
        facts.official_host("ap-southeast-4") == "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"
    )
    assert facts.official_host("us-east-1", fips=True) == (
        "602401143452.dkr.ecr-fips.us-east-1.amazonaws.com"
    )
    # no FIPS registry in eu-west-1: the plain host
    assert facts.official_host("eu-west-1", fips=True) == (
        "602401143452.dkr.ecr.eu-west-1.amazonaws.com"
    )
    assert (
        facts.official_host("us-west-2", dualstack=True) == "602401143452.dkr-ecr.us-west-2.on.aws"
    )
    assert facts.official_host("us-west-2", fips=True, dualstack=True) == (
        "602401143452.dkr-ecr-fips.us-west-2.on.aws"
    )
    # no dual-stack registry host is documented for aws-cn: the IPv4 host
    assert facts.official_host("cn-north-1", dualstack=True) == (
        "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn"
    )


def test_every_row_parses_back_to_itself() -> None:
    facts = ecr.default_facts()
    assert len(facts.regions) >= 40
    for region, row in facts.regions.items():
        h = ecr.parse_host(row.registry_host)
        assert h is not None, row
        assert (h.account, h.region, h.partition) == (row.account, region, row.partition)
        assert facts.is_official(h)
        assert ecr.partition_of_region(region) is not None
        assert ecr.partition_of_region(region).id == row.partition  # type: ignore[union-attr]


def test_manifest_matches_shipped_files() -> None:
    """The versioned manifest pins the bytes of the shipped data."""
    manifest = json.loads((DATA / "MANIFEST.json").read_text())
    assert manifest["version"] == ecr.DATA_VERSION
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", ["ecr_accounts.csv", "ecr_registry_host_variants.csv"])
def test_package_copy_agrees_with_shared(shared_dir: Path, name: str) -> None:
    """Our copy must say what ../shared says, row for row (sources included)."""

    def rows(p: Path) -> list[dict[str, str]]:
        with p.open(newline="") as f:
            return sorted(csv.DictReader(f), key=lambda r: sorted(r.items()))

    assert rows(DATA / name) == rows(shared_dir / name)
