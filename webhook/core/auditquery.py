"""Querying audit records: parse flags, pre-filter raw lines, match, summarise, render.  Pure.

The shell (``webhook.auditread``) hands this module raw lines (``bytes``) from
files, stdin or CloudWatch Logs; nothing here does I/O.

Speed comes from not parsing what cannot match.  ``webhook.auditlog`` writes
every record as compact JSON (``webhook.core.jsonc.dumps``) and
``webhook.core.audit.build_record`` fixes the key order, so a record as logged
starts with ``{"kind":"EcrWebhookAudit","schemaVersion":"`` and spells every
field the same way (``"namespace":"kube-system"``, ``"decision":"error"``; a
non-ASCII character as itself in UTF-8, or as a ``\\u`` escape in records of
earlier releases: the needles carry both spellings).  For such a *canonical* line, a needed
substring that is absent proves the record cannot match, so ``Scanner``
rejects it with a few ``bytes`` searches before any ``json.loads``; the
requestReceivedTimestamp, fixed-width RFC 3339 UTC, is compared as bytes.  A
substring that is present proves nothing (it may sit in another field): every
candidate is parsed and checked exactly.  Lines in any other shape (a shipper's
envelope, a record re-encoded with spaces) take the slow path: parse first,
then check.

What counts as a record, and what as damage:

* A line without the marker ``EcrWebhookAudit`` is not an audit record
  (operational logs, plain text): skipped silently.
* A record is *corrupt* when it is cut short (no closing brace: a line
  truncated by a crash, a full disk, a log shipper's line limit), is not valid
  UTF-8, or is not valid JSON.  Corrupt records are counted, never fatal.
  Cut-short and non-UTF-8 lines are recognised before the filters; a record
  that is valid UTF-8 and ends in a brace but breaks JSON inside is only
  noticed when it passes the pre-filter.
* A record of another ``schemaVersion`` is counted apart and skipped: this
  reader knows v1, whose fields are only ever added to (unknown extra fields,
  such as per-container ``probes``, are ignored).

Time bounds are half-open on ``requestReceivedTimestamp``: ``since <= t < until``,
so consecutive windows (``--since 2h --until 1h``, ``--since 1h``) never count a
record twice.
"""

from __future__ import annotations

import calendar
import fnmatch
import json
import re
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from webhook.core.audit import KIND, SCHEMA_VERSION
from webhook.core.errors import ConfigError

MARK = KIND.encode()
CANON = b'{"kind":"' + MARK + b'","schemaVersion":"'
CANON_V1 = CANON + SCHEMA_VERSION.encode() + b'"'
TS_KEY = b'"requestReceivedTimestamp":"'
_ENDINGS = (b"}", b"}\n", b"}\r\n")
TS_LEN = len("2026-12-01T10:00:00.000000Z")
# A record that another process prefixed on its line: containerd's CRI log
# format ("<RFC 3339> stdout F <line>"), `kubectl logs --timestamps` and
# `kubectl logs --prefix` ("[pod/NAME/CONTAINER] <line>").
PREFIXED = b' {"kind":"' + MARK + b'"'
_PREFIXED_TEXT = PREFIXED.decode()
# Keys under which log shippers carry the original line: Fluent Bit and
# Docker's json-file driver ("log"), CloudWatch agent and Vector ("message"),
# journald ("MESSAGE").  Any other top-level string holding a record is found too.
ENVELOPE_KEYS = ("log", "message", "MESSAGE", "msg")
DECISIONS = ("patched", "unchanged", "skipped", "error")
SUMMARY_KIND = "EcrWebhookAuditSummary"
SUMMARY_SCHEMA_VERSION = "v1"
TOP = 10
K = TypeVar("K")

# --------------------------------------------------------------------- times


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


def _parse(value: str, now: float, flag: str) -> float | datetime:
    text = value.strip()
    if text and _DURATION.sub("", text) == "" and _DURATION.match(text):
        seconds = sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))
        return now - seconds
    if _RFC3339.fullmatch(text):
        stamp = text.replace(" ", "T").replace("t", "T").replace("z", "Z")
        # Python 3.11 fromisoformat takes "Z" and up to 6 fraction digits;
        # longer fractions (RFC 3339 allows them) are cut to microseconds.
        m = re.match(r"(.*?\.\d{6})\d+(.*)", stamp)
        if m:
            stamp = m.group(1) + m.group(2)
        try:
            return datetime.fromisoformat(stamp)
        except ValueError:
            pass
    raise ConfigError(
        f"{flag}: {value!r} is neither a duration (90s, 2h, 1h30m, 7d) nor an RFC 3339 "
        "time with a zone (2026-12-01T10:00:00Z)"
    )


def parse_time(value: str, now: float, flag: str = "--since") -> float:
    """``value`` as epoch seconds: a duration before ``now`` or an RFC 3339 time.

    Durations are Go-style sums of number+unit (``90s``, ``2h``, ``1h30m``,
    ``7d``, ``2w``; ``d`` is 24 h).  RFC 3339 needs a zone (``Z`` or ``+02:00``):
    a time without one would mean different instants on different machines.
    Raises ``ConfigError`` (exit 2) naming the flag and the value.
    """
    t = _parse(value, now, flag)
    try:
        return t.timestamp() if isinstance(t, datetime) else t
    except (OverflowError, OSError, ValueError):
        raise _out_of_range(value, flag) from None


def parse_bound(value: str, now: float, flag: str) -> str:
    """``value`` (as ``parse_time``) as a canonical timestamp, exact to the microsecond.

    An RFC 3339 time is converted without a float round trip, which would be
    off by a microsecond for some values.
    """
    t = _parse(value, now, flag)
    try:
        if isinstance(t, datetime):
            return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return iso(t)
    except (OverflowError, OSError, ValueError):  # gmtime and datetime have limits
        raise _out_of_range(value, flag) from None


def _out_of_range(value: str, flag: str) -> ConfigError:
    return ConfigError(f"{flag}: {value!r} is out of the range of times this tool can compare "
                       "(years 1 to 9999, UTC)")


def iso(ts: float) -> str:
    """Epoch seconds in the records' own format (RFC 3339 UTC, microseconds, ``Z``)."""
    seconds, micros = divmod(round(ts * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def canonical_ts(value: object) -> str | None:
    """A record timestamp in canonical form, or None when it is not a time.

    The server always writes the canonical form; anything else (a record
    re-encoded by other tools) is parsed and normalised so it still compares.
    """
    if not isinstance(value, str):
        return None
    if len(value) == TS_LEN and value[-1] == "Z" and value[10] == "T":
        return value
    try:
        return parse_bound(value, 0.0, "timestamp")
    except ConfigError:
        return None


def epoch(ts: str) -> float:
    """A canonical timestamp as epoch seconds."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float(ts[19:-1] or 0)


# --------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filters:
    """What the user asked for.  Each tuple is an OR of values; flags are ANDed.

    ``since``/``until`` are canonical timestamps (``iso``).  ``images`` are
    shell globs matched against a container's ``from`` and ``to``; ``owners``
    are (kind, name) with the kind compared case-insensitively, as kubectl
    spells kinds either way (``DaemonSet/aws-node``, ``daemonset/aws-node``).
    """

    since: str | None = None
    until: str | None = None
    namespaces: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    owners: tuple[tuple[str, str], ...] = ()
    dry_run: bool | None = None

    @property
    def by_container(self) -> bool:
        """Whether some filters select containers (then only those are shown and counted)."""
        return bool(self.images or self.reasons)


def parse_owner(value: str) -> tuple[str, str]:
    """``KIND/NAME`` -> (kind, name); ``ConfigError`` otherwise."""
    kind, sep, name = value.partition("/")
    if not sep or not kind or not name or "/" in name:
        raise ConfigError(f"--owner: {value!r} is not KIND/NAME (for example DaemonSet/aws-node)")
    return kind, name


def build_filters(
    *,
    since: str | None = None,
    until: str | None = None,
    now: float,
    namespaces: Sequence[str] = (),
    images: Sequence[str] = (),
    reasons: Sequence[str] = (),
    decisions: Sequence[str] = (),
    users: Sequence[str] = (),
    owners: Sequence[str] = (),
    dry_run: bool | None = None,
) -> Filters:
    """Filters from command-line values; ``ConfigError`` (exit 2) for a bad one."""
    lo = parse_bound(since, now, "--since") if since is not None else None
    hi = parse_bound(until, now, "--until") if until is not None else None
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"--since ({lo}) must be before --until ({hi})")
    bad = [d for d in decisions if d not in DECISIONS]
    if bad:
        raise ConfigError(f"--decision: {bad[0]!r} is not one of {', '.join(DECISIONS)}")
    return Filters(
        since=lo,
        until=hi,
        namespaces=tuple(namespaces),
        images=tuple(images),
        reasons=tuple(reasons),
        decisions=tuple(decisions),
        users=tuple(users),
        owners=tuple(parse_owner(o) for o in owners),
        dry_run=dry_run,
    )


def _js(value: str) -> tuple[bytes, ...]:
    """``value`` as a JSON string, in each spelling an audit writer uses.

    The server writes UTF-8 (``webhook.core.jsonc``: non-ASCII characters as
    themselves); records of earlier releases, and of the standard library's
    fallback path, spell them as ``\\u`` escapes.  A needle must match either.
    """
    ascii_ = json.dumps(value).encode()
    utf8 = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return (ascii_,) if utf8 == ascii_ else (ascii_, utf8)


def _glob_literal(glob: str) -> str:
    """The longest run of ordinary characters in a shell glob ('' if none)."""
    parts = re.split(r"\[[^\]]*\]|[*?\[]", glob)
    return max(parts, key=len) if parts else ""


def needles(f: Filters) -> tuple[tuple[bytes, ...], ...]:
    """Byte strings a canonical line must contain to possibly match: AND of OR-groups.

    Each needle is spelled exactly as the writer spells the field, so for a
    canonical line a missing needle proves a mismatch.  A group is left out
    when no needle can be sure (a glob without literal characters).
    """
    groups: list[tuple[bytes, ...]] = []
    if f.namespaces:
        groups.append(tuple(b'"namespace":' + j for n in f.namespaces for j in _js(n)))
    if f.decisions:
        groups.append(tuple(b'"decision":' + j for d in f.decisions for j in _js(d)))
    if f.users:
        groups.append(tuple(b'"username":' + j for u in f.users for j in _js(u)))
    if f.reasons:
        groups.append(tuple(b'"reason":' + j for r in f.reasons for j in _js(r)))
    if f.owners:
        # The owner's name only: its kind may be spelled in another case.
        groups.append(tuple(j for _, name in f.owners for j in _js(name)))
    if f.dry_run is not None:
        groups.append((b'"dryRun":true',) if f.dry_run else (b'"dryRun":false',))
    if f.images:
        literals = [_glob_literal(g) for g in f.images]
        if all(literals):
            groups.append(tuple(j[1:-1] for lit in literals for j in _js(lit)))
    return tuple(groups)


def _mapping(value: object) -> Mapping[str, Any]:
    # dict, not the Mapping ABC: records come from json.loads, and an ABC check
    # costs several times more on the per-record path.
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def containers_of(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = record.get("containers")
    return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []


def select(record: Mapping[str, Any], f: Filters) -> list[Mapping[str, Any]] | None:
    """The exact check.  None: no match; else the containers the filters select.

    Without container filters (``--image``, ``--reason``) every container of a
    matching record is selected; with them, only matching containers, and a
    record with none does not match.
    """
    if f.since is not None or f.until is not None:
        ts = canonical_ts(record.get("requestReceivedTimestamp"))
        if ts is None:
            return None
        if (f.since is not None and ts < f.since) or (f.until is not None and ts >= f.until):
            return None
    obj = _mapping(record.get("objectRef"))
    if f.namespaces and obj.get("namespace") not in f.namespaces:
        return None
    if f.decisions and record.get("decision") not in f.decisions:
        return None
    if f.users and _mapping(record.get("user")).get("username") not in f.users:
        return None
    if f.dry_run is not None and (record.get("dryRun") is True) != f.dry_run:
        return None
    if f.owners:
        owner = _mapping(record.get("owner"))
        kind, name = _str(owner.get("kind")).lower(), owner.get("name")
        if not any(kind == k.lower() and name == n for k, n in f.owners):
            return None
    containers = containers_of(record)
    if not f.by_container:
        return containers
    chosen = [
        c
        for c in containers
        if (not f.reasons or c.get("reason") in f.reasons)
        and (
            not f.images
            or any(
                isinstance(img, str) and fnmatch.fnmatchcase(img, g)
                for g in f.images
                for img in (c.get("from"), c.get("to"))
            )
        )
    ]
    return chosen or None


# --------------------------------------------------------------------- scanning


@dataclass(frozen=True, slots=True)
class Hit:
    """A matching record: its timestamp, its bytes as logged, the parsed record,
    and the containers the filters selected."""

    ts: str
    raw: bytes
    record: Mapping[str, Any]
    containers: list[Mapping[str, Any]]


@dataclass
class Counts:
    """What a scan saw.  ``records`` counts lines recognised as audit records."""

    records: int = 0
    matched: int = 0
    truncated: int = 0
    invalid_utf8: int = 0
    invalid_json: int = 0
    other_schema: Counter[str] = field(default_factory=Counter)

    @property
    def corrupt(self) -> int:
        return self.truncated + self.invalid_utf8 + self.invalid_json

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "matched": self.matched,
            "corrupt": self.corrupt,
            "truncated": self.truncated,
            "invalidUtf8": self.invalid_utf8,
            "invalidJson": self.invalid_json,
            "otherSchema": sum(self.other_schema.values()),
        }


TRUNCATED = "truncated record (no closing brace)"
INVALID_UTF8 = "record is not valid UTF-8"
INVALID_JSON = "record is not valid JSON"


def other_schema_note(version: object) -> str:
    return f"record of schemaVersion {version!r} skipped (this reader knows {SCHEMA_VERSION})"


class Scanner:
    """Turns raw lines into ``Hit``s.  One per query; it keeps the ``Counts``.

    ``scan(line)`` returns a ``Hit``, None (not a record, or filtered out), or
    a ``str`` describing a corrupt or foreign record (already counted) for the
    caller to report with the line's location.
    """

    def __init__(self, filters: Filters) -> None:
        self.filters = filters
        self.counts = Counts()
        self._groups = needles(filters)
        self._since = filters.since.encode() if filters.since else None
        self._until = filters.until.encode() if filters.until else None
        self._bounded = self._since is not None or self._until is not None

    def scan(self, line: bytes) -> Hit | str | None:
        if line.startswith(CANON):
            return self._canonical(line)
        if MARK not in line:
            return None
        i = line.find(PREFIXED)
        if i > 0:
            return self._canonical(line[i + 1 :])
        return self._shaped(line)

    def scan_lines(
        self, lines: list[bytes], block: bytes | None = None
    ) -> list[tuple[int, Hit | str]]:
        """``scan`` over many lines: (index, result) of each line that gave a
        ``Hit`` or a problem.

        The same decisions as ``scan``; the common case (a well-formed v1 line
        as the server writes it) is inlined in one loop with local names,
        which is most of the time spent per line in a filtered query.  Given
        the ``block`` the lines were split from, two checks are made once for
        the whole block instead of per line: whether it is ASCII, and whether
        a needed needle occurs in it at all (if not, no line can match, and
        lines are only checked and counted).
        """
        out: list[tuple[int, Hit | str]] = []
        canon, groups = CANON_V1, self._groups
        since, until, bounded = self._since, self._until, self._bounded
        slow, parse = self.scan, self._parse
        ascii_ = block is not None and block.isascii()
        hopeless = block is not None and any(all(n not in block for n in g) for g in groups)
        records = 0
        for i, line in enumerate(lines):
            # Lines of a block come without their "\n"; one with "\r" or any
            # other oddity takes the general path.
            if not (line.startswith(canon) and line.endswith(b"}") and (ascii_ or line.isascii())):
                r = slow(line)
                if r is not None:
                    out.append((i, r))
                continue
            records += 1
            if hopeless:
                continue
            if bounded:
                k = line.find(TS_KEY)
                if k >= 0:
                    ts = line[k + 28 : k + 28 + TS_LEN]
                    if ts.endswith(b"Z") and (
                        (since is not None and ts < since) or (until is not None and ts >= until)
                    ):
                        continue
            ok = True
            for group in groups:
                for needle in group:
                    if needle in line:
                        break
                else:
                    ok = False
                    break
            if ok:
                r = parse(line)
                if r is not None:
                    out.append((i, r))
        self.counts.records += records
        return out

    def _canonical(self, line: bytes) -> Hit | str | None:
        """A line starting like a record as the server writes it: the fast path.

        Cheap checks first, each a single pass in C over the bytes; the
        newline is stripped (a copy) only for a line that passed them.
        """
        counts = self.counts
        counts.records += 1
        if not line.endswith(_ENDINGS):
            counts.truncated += 1
            return TRUNCATED
        if not line.isascii():
            try:
                line.decode()
            except UnicodeDecodeError:
                counts.invalid_utf8 += 1
                return INVALID_UTF8
        if line.startswith(CANON_V1):
            if self._bounded:
                i = line.find(TS_KEY)
                if i >= 0:
                    ts = line[i + 28 : i + 28 + TS_LEN]
                    if ts.endswith(b"Z") and (
                        (self._since is not None and ts < self._since)
                        or (self._until is not None and ts >= self._until)
                    ):
                        return None
            for group in self._groups:
                for needle in group:
                    if needle in line:
                        break
                else:
                    return None
        return self._parse(line)

    def _parse(self, line: bytes) -> Hit | str | None:
        raw = line.rstrip(b"\r\n")
        try:
            record = json.loads(raw)
        except ValueError:
            self.counts.invalid_json += 1
            return INVALID_JSON
        return self._check(raw, record)

    def _check(self, raw: bytes, record: object) -> Hit | str | None:
        if not isinstance(record, dict) or record.get("kind") != KIND:
            self.counts.invalid_json += 1
            return INVALID_JSON
        version = record.get("schemaVersion")
        if version != SCHEMA_VERSION:
            self.counts.other_schema[str(version)] += 1
            return other_schema_note(version)
        chosen = select(record, self.filters)
        if chosen is None:
            return None
        self.counts.matched += 1
        ts = canonical_ts(record.get("requestReceivedTimestamp")) or ""
        return Hit(ts, raw, record, chosen)

    def _shaped(self, line: bytes) -> Hit | str | None:
        """A line holding the marker in another shape: an envelope, or a re-encoded record."""
        raw = line.strip()
        try:
            doc = json.loads(raw)
        except ValueError:
            self.counts.records += 1
            if not raw.endswith(b"}"):
                self.counts.truncated += 1
                return TRUNCATED
            try:
                raw.decode()
            except UnicodeDecodeError:
                self.counts.invalid_utf8 += 1
                return INVALID_UTF8
            self.counts.invalid_json += 1
            return INVALID_JSON
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            self.counts.records += 1
            return self._check(raw, doc)
        inner = unwrap(doc)
        if inner is None:
            return None  # mentions the marker, holds no record (say, an operational log)
        if isinstance(inner, bytes):
            if inner.startswith(CANON):
                return self._canonical(inner)
            return self._shaped(inner) if MARK in inner else None
        # A shipper that parsed the record and dropped its text: re-encode it
        # the way the server writes it (same key order, compact separators).
        self.counts.records += 1
        return self._check(encode(inner), inner)


def encode(record: Mapping[str, Any]) -> bytes:
    """A record as ``webhook.auditlog`` writes it (without the newline)."""
    return json.dumps(record, separators=(",", ":"), default=str).encode()


def unwrap(envelope: object) -> bytes | dict[str, Any] | None:
    """The audit record inside a log shipper's envelope, if any.

    Fluent Bit (the EKS Container Insights set-up) sends each container line to
    CloudWatch Logs as ``{"log": "<line>", "stream": "stdout", "kubernetes":
    {...}}``; with ``Merge_Log`` it also adds the parsed line as an object
    (under ``log_processed`` in Container Insights' configuration), and with
    ``Keep_Log Off`` only that object is left.  Returns the line as bytes
    (the record byte for byte) when the envelope carries it, else the parsed
    record object, else None.
    """
    if not isinstance(envelope, dict):
        return None
    keys = [k for k in ENVELOPE_KEYS if k in envelope] + [
        k for k in envelope if k not in ENVELOPE_KEYS
    ]
    found: dict[str, Any] | None = None
    for key in keys:
        value = envelope[key]
        if isinstance(value, str) and KIND in value:
            text = value.strip()
            # A record, or a record behind a prefix (a CRI line); not a message
            # that merely mentions the kind.
            if text.startswith("{") or _PREFIXED_TEXT in text:
                return text.encode()
        if isinstance(value, dict) and found is None and value.get("kind") == KIND:
            found = value
    return found


# --------------------------------------------------------------------- summary


def registry(image: str) -> str:
    """The registry host of an image reference (``docker.io`` for bare names).

    distribution/reference: the first component is a host when it has a dot or
    a colon, or is ``localhost``.
    """
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _is_rewrite(c: Mapping[str, Any]) -> bool:
    return c.get("action") == "rewrite" and isinstance(c.get("to"), str)


@dataclass
class Summary:
    """Counts over matching records; ``add`` each hit, then ``as_json``/``render``."""

    records: int = 0
    dry_run: int = 0
    first: str | None = None
    last: str | None = None
    decisions: Counter[str] = field(default_factory=Counter)
    namespaces: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)
    images: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)

    def add(self, hit: Hit) -> None:
        rec = hit.record
        self.records += 1
        if hit.ts:
            if self.first is None or hit.ts < self.first:
                self.first = hit.ts
            if self.last is None or hit.ts > self.last:
                self.last = hit.ts
        if rec.get("dryRun") is True:
            self.dry_run += 1
        self.decisions[_str(rec.get("decision")) or "?"] += 1
        self.namespaces[_str(_mapping(rec.get("objectRef")).get("namespace"))] += 1
        for c in hit.containers:
            self.reasons[_str(c.get("reason"))] += 1
            self.actions[_str(c.get("action"))] += 1
            if _is_rewrite(c):
                source = _str(c.get("from"))
                self.routes[(registry(source), registry(_str(c.get("to"))))] += 1
                self.images[source] += 1
        error = rec.get("error")
        if isinstance(error, str) and error:
            self.errors[error] += 1
        warnings = rec.get("warnings")
        if isinstance(warnings, list):
            for w in warnings:
                if isinstance(w, str):
                    self.warnings[w] += 1

    def as_json(self, counts: Counts | None = None) -> dict[str, Any]:
        """The ``--summary --output json`` object (a versioned contract, see the README)."""
        doc: dict[str, Any] = {
            "kind": SUMMARY_KIND,
            "schemaVersion": SUMMARY_SCHEMA_VERSION,
            "records": self.records,
            "dryRun": self.dry_run,
            "span": {"first": self.first, "last": self.last} if self.first else None,
            "decisions": _ordered(self.decisions),
            "namespaces": _ordered(self.namespaces),
            "reasons": _ordered(self.reasons),
            "actions": _ordered(self.actions),
            "routes": [
                {"from": src, "to": dst, "containers": n} for (src, dst), n in _ranked(self.routes)
            ],
            "images": [{"image": i, "containers": n} for i, n in _ranked(self.images)[:TOP]],
            "errors": [{"error": e, "records": n} for e, n in _ranked(self.errors)],
            "warnings": [{"warning": w, "records": n} for w, n in _ranked(self.warnings)],
        }
        if counts is not None:
            doc["input"] = counts.as_json()
        return doc


def _ranked(counter: Mapping[K, int]) -> list[tuple[K, int]]:
    """Most frequent first; ties in key order, so output is stable across runs."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))


def _ordered(counter: Mapping[str, int]) -> dict[str, int]:
    return dict(_ranked(counter))


# --------------------------------------------------------------------- rendering

WIDTH = 80
_ECR_SUFFIX = re.compile(
    r"^(\d{12}\.dkr[.-]ecr(?:-fips)?\.[a-z0-9-]+)\."
    r"(?:amazonaws\.com(?:\.cn)?|amazonaws\.eu|on\.aws|c2s\.ic\.gov|sc2s\.sgov\.gov"
    r"|cloud\.adc-e\.uk|csp\.hci\.ic\.gov)(?=/|$)"
)


def short_image(image: str) -> str:
    """An image with its ECR host's domain dropped (the region implies it).

    ``602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1`` ->
    ``602401143452.dkr.ecr.ap-southeast-4/amazon-k8s-cni:v1``: a full ECR
    reference (often over 80 characters) then fits a terminal line.  Other
    hosts are kept whole.
    """
    return _ECR_SUFFIX.sub(r"\1", image, count=1)


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` with an ellipsis in the middle (both ends carry meaning)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def fold(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width``: at spaces where it can, else hard
    (an image reference has no spaces); nothing is cut away."""
    if len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


TABLE_HEADER = f"{'TIME':<8}  {'REASON':<17}  {'NAMESPACE/POD':<30}  CONTAINER"
_INDENT = 2


def pod_label(record: Mapping[str, Any]) -> str:
    """``namespace/name``; a pod created by a controller has no name yet at
    admission (the apiserver fills it in later from ``generateName``), shown
    as ``generateName*``."""
    ref = _mapping(record.get("objectRef"))
    name = _str(ref.get("name")) or (_str(ref.get("generateName")) + "*")
    ns = _str(ref.get("namespace"))
    return f"{ns}/{name}" if ns else name


def table_rows(hit: Hit, by_container: bool) -> list[Mapping[str, Any]]:
    """The containers that get a table row: rewrites and warnings, or every
    container the container filters selected."""
    if by_container:
        return hit.containers
    return [c for c in hit.containers if c.get("action") in ("rewrite", "warn")]


def row_head(clock: str, reason: str, pod: str, container: str) -> str:
    """The first line of a row: aligned columns while they fit, the pod name
    shortened (in the middle) only when the line would pass ``WIDTH``."""
    head = f"{clock:<8}  {reason:<17}  "
    line = f"{head}{pod:<30}  {container}"
    if len(line) > WIDTH:
        room = max(WIDTH - len(head) - 2 - len(container), 20)
        line = f"{head}{clip(pod, room)}  {container}"
    return clip(line, WIDTH)


def image_lines(source: str, target: object) -> list[str]:
    """The image of a row.  A rewrite that keeps the repository path (all but a
    mirror with a prefix) shows the path, then the registry route; otherwise
    the old and the new reference.  ECR domains are dropped (``short_image``)."""
    src = short_image(source)
    if not isinstance(target, str) or not target:
        return _indented(src)
    dst = short_image(target)
    s_host, _, s_path = src.partition("/")
    d_host, _, d_path = dst.partition("/")
    if s_path and s_path == d_path:
        return _indented(s_path) + _indented(f"{s_host} → {d_host}")
    return _indented(src) + _indented("→ " + dst)


class TableRenderer:
    """Streams the table: a date line when the day changes, then per row
    ``TIME REASON NAMESPACE/POD CONTAINER`` and the image lines under it.
    Every line fits ``WIDTH`` columns; long texts are folded, not cut."""

    def __init__(self, by_container: bool) -> None:
        self.by_container = by_container
        self.day: str | None = None
        self.rows = 0
        self.silent = 0  # matching records with no row
        self.header_done = False

    def render(self, hit: Hit) -> list[str]:
        rec = hit.record
        containers = table_rows(hit, self.by_container)
        error = _str(rec.get("error"))
        if not containers and not error:
            self.silent += 1
            return []
        out: list[str] = []
        if not self.header_done:
            out.append(TABLE_HEADER)
            self.header_done = True
        day, clock = (hit.ts[:10], hit.ts[11:19]) if hit.ts else ("?", "?")
        if day != self.day:
            out.append(f"# {day} (UTC)")
            self.day = day
        pod = pod_label(rec)
        dry = _indented("(dry run: the pod was not created)") if rec.get("dryRun") is True else []
        if error and not containers:
            out.append(row_head(clock, "error", pod, "-"))
            out += _indented(error) + dry
            self.rows += 1
            return out
        for c in containers:
            out.append(row_head(clock, _str(c.get("reason")), pod, _str(c.get("container"))))
            out += image_lines(_str(c.get("from")), c.get("to")) + dry
            self.rows += 1
        if error:
            out += _indented(error)
        return out


def _indented(text: str) -> list[str]:
    return [" " * _INDENT + line for line in fold(text, WIDTH - _INDENT)]


def table_footer(matched: int, rows: int, silent: int, decisions: Mapping[str, int]) -> str:
    """The end of the table: what matched, and why some records have no row."""
    parts = ", ".join(f"{n} {d}" for d, n in _ranked(decisions))
    tail = f" ({parts})" if parts else ""
    text = f"{matched} {_plural(matched, 'record')} matched{tail}; {rows} {_plural(rows, 'row')}"
    if silent:
        text += f"; {silent} without a rewrite, warning or error, not shown"
    return "\n".join(fold(text, WIDTH))


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _count_lines(
    title: str, items: Iterable[tuple[Any, int]], limit: int | None = None
) -> list[str]:
    """``title``, then ``count  label`` lines; a long label is folded, never cut."""
    rows = list(items)
    if not rows:
        return []
    shown = rows[:limit] if limit else rows
    out = [title]
    for label, n in shown:
        parts = label if isinstance(label, list) else [label]
        lines = [x for part in parts for x in fold(str(part), WIDTH - 9)]
        out.append(f"{n:>7}  {lines[0]}")
        out.extend(" " * 9 + line for line in lines[1:])
    if len(rows) > len(shown):
        out.append(f"{'':>7}  … {len(rows) - len(shown)} more (--output json lists them all)")
    return out


def render_summary(s: Summary) -> list[str]:
    """``--summary`` for a terminal: counts first, like ``uniq -c``; ECR hosts
    shortened as in the table (``--output json`` has them whole)."""
    out = [f"records: {s.records}" + (f" ({s.dry_run} dry run)" if s.dry_run else "")]
    if s.first:
        out.append(f"span:    {s.first} .. {s.last}")
    if not s.records:
        return out
    out.append("")
    out += _count_lines("decisions", _ranked(s.decisions))
    routes = [([short_image(a), "→ " + short_image(b)], n) for (a, b), n in _ranked(s.routes)]
    out += _sep(_count_lines("routes (source registry → target registry), containers", routes))
    out += _sep(_count_lines("reasons, containers", _ranked(s.reasons)))
    out += _sep(_count_lines("namespaces, records", _ranked(s.namespaces), TOP))
    images: list[tuple[str | list[str], int]] = [(short_image(i), n) for i, n in _ranked(s.images)]
    out += _sep(_count_lines("top images rewritten, containers", images, TOP))
    out += _sep(_count_lines("errors, records", _ranked(s.errors), TOP))
    out += _sep(_count_lines("warnings, records", _ranked(s.warnings), TOP))
    return out


def _sep(lines: list[str]) -> list[str]:
    return ["", *lines] if lines else []


def corrupt_note(counts: Counts) -> list[str]:
    """Lines for stderr about what was skipped; empty when nothing was."""
    notes = []
    if counts.corrupt:
        kinds = [
            f"{n} {what}"
            for what, n in (
                ("truncated", counts.truncated),
                ("not UTF-8", counts.invalid_utf8),
                ("not JSON", counts.invalid_json),
            )
            if n
        ]
        notes.append(f"note: {counts.corrupt} corrupt record line(s) skipped ({', '.join(kinds)})")
    for version, n in sorted(counts.other_schema.items()):
        notes.append(
            f"note: {n} record(s) of schemaVersion {version!r} skipped "
            f"(this reader knows {SCHEMA_VERSION}; a newer ecr-webhook reads them)"
        )
    return notes
