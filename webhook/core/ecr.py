"""The Amazon ECR registry model: hosts, partitions and the official EKS registries.

Registry host forms (Amazon ECR user guide, "Making requests to Amazon ECR
registries"; docs.aws.amazon.com/general/latest/gr/ecr.html)::

    <account>.dkr.ecr.<region>.<dns-suffix>          IPv4
    <account>.dkr.ecr-fips.<region>.<dns-suffix>     FIPS 140 endpoint, some regions
    <account>.dkr-ecr.<region>.on.aws                dual-stack (IPv4 + IPv6)
    <account>.dkr-ecr-fips.<region>.on.aws           dual-stack FIPS

Which account serves the EKS system images in a region comes from the package
data ``data/ecr_accounts.csv`` and ``data/ecr_registry_host_variants.csv`` (copies
of ../shared, each row with its sources; ``tests/test_ecr.py`` keeps the
copies equal to the originals).  Loading that data (``default_facts``, once per
process) is the one read in the pure core, and it reads only the package's own
files; callers that want no read at all pass ``EcrFacts.from_csv(...)`` in.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from importlib import resources

# Version of the shipped registry facts; bump when data/*.csv change.
DATA_VERSION = "2026-11-26"


@dataclass(frozen=True, slots=True)
class Partition:
    """An AWS partition: its id, how its region names look, and its DNS suffix."""

    id: str
    region_regex: str
    dns_suffix: str
    # ECR dual-stack registry hosts end in "on.aws" (ECR user guide); the guide
    # names no dual-stack registry host for other partitions, so we build none.
    dualstack_suffix: str | None


# From the AWS SDK partitions file (aws-sdk-go-v2 internal/endpoints/awsrulesfn/
# partitions.json, as vendored by amazon-eks-ami nodeadm; ../shared/corpus/sdk).
PARTITIONS: tuple[Partition, ...] = (
    Partition("aws", r"^(us|eu|ap|sa|ca|me|af|il|mx)\-\w+\-\d+$", "amazonaws.com", "on.aws"),
    Partition("aws-cn", r"^cn\-\w+\-\d+$", "amazonaws.com.cn", None),
    Partition("aws-us-gov", r"^us\-gov\-\w+\-\d+$", "amazonaws.com", "on.aws"),
    Partition("aws-eusc", r"^eusc\-(de)\-\w+\-\d+$", "amazonaws.eu", None),
    Partition("aws-iso", r"^us\-iso\-\w+\-\d+$", "c2s.ic.gov", None),
    Partition("aws-iso-b", r"^us\-isob\-\w+\-\d+$", "sc2s.sgov.gov", None),
    Partition("aws-iso-e", r"^eu\-isoe\-\w+\-\d+$", "cloud.adc-e.uk", None),
    Partition("aws-iso-f", r"^us\-isof\-\w+\-\d+$", "csp.hci.ic.gov", None),
)
_PARTITION_BY_ID = {p.id: p for p in PARTITIONS}
# The "aws" regex also matches us-gov-*, us-iso-* and eu-isoe-* names, so the
# specific partitions are tried first.
_MATCH_ORDER = sorted(PARTITIONS, key=lambda p: p.id == "aws")
_SUFFIXES = sorted({p.dns_suffix for p in PARTITIONS}, key=len, reverse=True)
_REGION = r"[a-z]{2,4}(?:-[a-z]+)+-\d+"
_HOST_RE = re.compile(
    rf"^(?P<account>\d{{12}})\.dkr\.ecr(?P<fips>-fips)?\.(?P<region>{_REGION})\."
    rf"(?P<suffix>{'|'.join(re.escape(s) for s in _SUFFIXES)})$"
)
_DUALSTACK_RE = re.compile(
    rf"^(?P<account>\d{{12}})\.dkr-ecr(?P<fips>-fips)?\.(?P<region>{_REGION})\.on\.aws$"
)


_COMPILED = [(re.compile(p.region_regex), p) for p in _MATCH_ORDER]


@cache
def partition_of_region(region: str) -> Partition | None:
    """The partition a region name belongs to, by the SDK's region regexes."""
    for rx, p in _COMPILED:
        if rx.match(region):
            return p
    return None


def partition(partition_id: str) -> Partition:
    return _PARTITION_BY_ID[partition_id]


@dataclass(frozen=True, slots=True)
class EcrHost:
    """A parsed ECR registry host.

    ``suffix_partition`` is the partition its DNS suffix implies; when it differs
    from the region's partition the host cannot exist (for example
    ``cn-north-1.amazonaws.com``), which ``consistent`` reports.
    """

    account: str
    region: str
    fips: bool
    dualstack: bool
    suffix: str
    region_partition: str | None

    @property
    def host(self) -> str:
        if self.dualstack:
            return f"{self.account}.dkr-ecr{'-fips' if self.fips else ''}.{self.region}.on.aws"
        return f"{self.account}.dkr.ecr{'-fips' if self.fips else ''}.{self.region}.{self.suffix}"

    @property
    def partition(self) -> str | None:
        return self.region_partition

    @property
    def consistent(self) -> bool:
        """True when the DNS suffix belongs to the region's partition."""
        if self.region_partition is None:
            return False
        p = _PARTITION_BY_ID[self.region_partition]
        if self.dualstack:
            return p.dualstack_suffix == self.suffix
        return p.dns_suffix == self.suffix


def parse_host(host: str | None) -> EcrHost | None:
    """Parse an ECR registry host (no port); None when it is not one."""
    if not host:
        return None
    return _parse_host(host)


@lru_cache(maxsize=1024)
def _parse_host(host: str) -> EcrHost | None:
    h = host.lower()
    m = _HOST_RE.match(h)
    dualstack = False
    if m is None:
        m = _DUALSTACK_RE.match(h)
        dualstack = True
        if m is None:
            return None
    region = m.group("region")
    p = partition_of_region(region)
    return EcrHost(
        account=m.group("account"),
        region=region,
        fips=m.group("fips") is not None,
        dualstack=dualstack,
        suffix="on.aws" if dualstack else m.group("suffix"),
        region_partition=p.id if p else None,
    )


def looks_like_ecr(host: str | None) -> bool:
    """Cheap pre-filter, the same one the webhook's CEL matchConditions use."""
    if not host:
        return False
    h = host.lower()
    return ".dkr.ecr" in h or ".dkr-ecr" in h


@dataclass(frozen=True, slots=True)
class RegionFacts:
    region: str
    partition: str
    account: str
    registry_host: str
    fips_host: str | None


@dataclass(frozen=True)
class EcrFacts:
    """Region -> official EKS registry facts.  Immutable; build with ``from_csv``."""

    regions: Mapping[str, RegionFacts]

    @classmethod
    def from_csv(cls, accounts_csv: str, variants_csv: str) -> EcrFacts:
        """Build from the text of the two CSV files (pure: no file access)."""
        fips: dict[str, str] = {}
        for row in csv.DictReader(io.StringIO(variants_csv)):
            if row["variant"] == "fips":
                fips[row["region"]] = row["registry_host"]
        regions: dict[str, RegionFacts] = {}
        for row in csv.DictReader(io.StringIO(accounts_csv)):
            regions[row["region"]] = RegionFacts(
                region=row["region"],
                partition=row["partition"],
                account=row["account"],
                registry_host=row["registry_host"],
                fips_host=fips.get(row["region"]),
            )
        return cls(regions=regions)

    @cached_property
    def eks_accounts(self) -> frozenset[str]:
        # Computed once: StaticOracle.check asks for it on every unmemoised check.
        return frozenset(r.account for r in self.regions.values())

    def partition_of(self, region: str) -> str | None:
        facts = self.regions.get(region)
        if facts is not None:
            return facts.partition
        p = partition_of_region(region)
        return p.id if p else None

    def official_host(self, region: str, *, fips: bool = False, dualstack: bool = False) -> str:
        """The official EKS registry host of ``region``.

        FIPS and dual-stack are kept only where the region has them: FIPS where the
        variants file lists a FIPS host; dual-stack where the partition has a
        dual-stack suffix.  Raises KeyError for a region with no known account.
        """
        facts = self.regions[region]
        use_fips = fips and facts.fips_host is not None
        p = _PARTITION_BY_ID[facts.partition]
        if dualstack and p.dualstack_suffix is not None:
            return EcrHost(
                facts.account, region, use_fips, True, p.dualstack_suffix, facts.partition
            ).host
        if use_fips:
            assert facts.fips_host is not None  # nosec B101  # invariant of the table; mypy narrowing
            return facts.fips_host
        return facts.registry_host

    def is_official(self, host: EcrHost) -> bool:
        """True when ``host`` is exactly the EKS account of its own region."""
        facts = self.regions.get(host.region)
        return facts is not None and facts.account == host.account and host.consistent


@cache
def default_facts() -> EcrFacts:
    """The facts shipped as package data (read once per process)."""
    data = resources.files("webhook") / "data"
    return EcrFacts.from_csv(
        (data / "ecr_accounts.csv").read_text(encoding="utf-8"),
        (data / "ecr_registry_host_variants.csv").read_text(encoding="utf-8"),
    )
