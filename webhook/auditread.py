"""``ecr-webhook audit``: read audit records from files, stdin or CloudWatch Logs.  A shell module.

Everything that decides (pre-filter, match, summary, rendering) is in the pure
``webhook.core.auditquery``; this module opens sources, feeds it lines and
writes what it returns.

Sources and their order:

* A file is read as bytes; gzip is recognised by its magic number, whatever
  the name.  A directory stands for the regular files in it (not hidden ones,
  not the writer's ``*.lock``).  ``-`` is stdin.
* Each source is one stream of records in the order written.  Several
  streams (rotated backups ``audit.jsonl.N``, the files of several replicas,
  stdin, CloudWatch) are merged by ``requestReceivedTimestamp``, so output is in
  time order across them whatever order they were named in.  Only matching
  records take part in the merge: filtering stays per line.
* CloudWatch Logs: ``FilterLogEvents`` over the log group, paginated, with
  the time bounds pushed down as ``startTime``/``endTime`` and the filter
  pattern ``"EcrWebhookAudit"`` so only events holding a record come back.
  boto3 is imported only here, only when a log group is given.

Missing or unreadable sources end the command (``InputError``, exit 2) before
anything is printed; damage inside a readable source (corrupt lines, a gzip
stream cut short) is counted and noted on stderr, never fatal.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, cast

from webhook.core import auditquery as q
from webhook.core.errors import ConfigError, InputError

STDIN = "-"
GZIP_MAGIC = b"\x1f\x8b"
# The filter pattern selecting audit records server-side.  A quoted term
# matches events whose message contains it (CloudWatch Logs "Filter pattern
# syntax", "Matching terms in unstructured log events"); it also matches a
# record escaped inside a shipper's JSON envelope.
CLOUDWATCH_PATTERN = '"EcrWebhookAudit"'
# Pushing time bounds down: an event's timestamp is set when its line is read
# (Fluent Bit's tail input, or the container runtime's timestamp), always
# after the record's requestReceivedTimestamp, by the admission latency plus
# the shipper's delay.  So startTime can be the lower bound itself, and
# endTime must allow for that delay; the exact bounds are applied to the
# records.  One minute back covers clock steps between the node and the pod.
START_SLACK_MS = 60_000
END_SLACK_MS = 15 * 60_000
MAX_NOTED = 5
BLOCK = 1 << 20


@dataclass
class Problems:
    """Corrupt and foreign records seen, with the first few locations."""

    examples: list[str] = field(default_factory=list)
    hidden: int = 0

    def add(self, where: str, what: str) -> None:
        if len(self.examples) < MAX_NOTED:
            self.examples.append(f"  {where}: {what}")
        else:
            self.hidden += 1


# --------------------------------------------------------------------- sources


def expand(sources: Sequence[str]) -> list[str]:
    """Files to read, in the order given (directories expanded, sorted by name).

    Raises ``InputError`` for a missing or unreadable source, before any output.
    """
    out: list[str] = []
    for src in sources:
        if src == STDIN:
            if STDIN in out:
                raise InputError("'-' (stdin) given twice")
            out.append(src)
            continue
        path = Path(src)
        if path.is_dir():
            try:
                names = sorted(p for p in path.iterdir() if _wanted(p))
            except OSError as exc:
                raise InputError(f"{src}: cannot list the directory: {exc.strerror}") from exc
            if not names:
                raise InputError(f"{src}: no files in the directory")
            out.extend(str(p) for p in names)
        elif path.exists():
            out.append(src)
        else:
            raise InputError(f"{src}: no such file or directory")
    for name in out:
        if name != STDIN and not os.access(name, os.R_OK):
            raise InputError(f"{name}: not readable (permission denied)")
    return out


def _wanted(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix != ".lock"


def open_blocks(name: str) -> tuple[io.BufferedReader, Iterator[bytes]]:
    """A file (or stdin) and its content in blocks, gunzipped when it starts
    with gzip's magic number.  ``read1`` returns what a pipe has, so records
    from a live ``kubectl logs -f`` are not held back until a block fills."""
    if name == STDIN:
        raw = cast(io.BufferedReader, sys.stdin.buffer)
        gz = raw.peek(2)[:2] == GZIP_MAGIC
    else:
        try:
            raw = open(name, "rb")  # noqa: SIM115 - closed by the reader
        except OSError as exc:
            raise InputError(f"{name}: cannot open: {exc.strerror}") from exc
        try:
            gz = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
        except OSError as exc:  # opens but cannot be read or rewound (EIO, a device)
            raw.close()
            raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    return raw, gunzip(raw) if gz else iter(lambda: raw.read1(BLOCK), b"")


def gunzip(raw: io.BufferedReader) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream (several members, as ``cat a.gz b.gz``, too).

    Unlike ``gzip.GzipFile``, which raises before returning the data of a
    stream that ends early, this yields everything that decompresses, then
    raises ``EOFError``: a backup cut short by a copy during rotation loses
    only its tail.
    """
    d = zlib.decompressobj(zlib.MAX_WBITS | 16)
    fed = False
    while data := raw.read1(BLOCK):
        while data:
            out = d.decompress(data)
            fed = True
            if out:
                yield out
            if d.eof:
                data, d, fed = d.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 16), False
            else:
                data = b""
    if fed and not d.eof:
        raise EOFError("compressed data ends before the end of its stream")


def file_hits(scanner: q.Scanner, name: str, problems: Problems) -> Iterator[q.Hit]:
    """The matching records of one file or stdin, in file order.

    Reads in large blocks split at newlines, which costs a third of reading
    line by line.
    """
    where = "<stdin>" if name == STDIN else name
    raw, blocks = open_blocks(name)
    scan, scan_lines = scanner.scan, scanner.scan_lines
    n = 0  # lines before the current block
    rest = b""
    try:
        for block in blocks:
            lines = block.split(b"\n")
            if rest:
                lines[0] = rest + lines[0]
            rest = lines.pop()
            for i, r in scan_lines(lines, block):
                if isinstance(r, str):
                    problems.add(f"{where}:{n + i + 1}", r)
                else:
                    yield r
            n += len(lines)
        if rest:  # a last line without its newline (the writer stopped mid-line)
            last = scan(rest)
            if isinstance(last, str):
                problems.add(f"{where}:{n + 1}", last)
            elif last is not None:
                yield last
    except (EOFError, zlib.error) as exc:
        # A gzip stream cut short or damaged: what was read counts; the rest is
        # damage, noted like a corrupt line.
        scanner.counts.truncated += 1
        problems.add(f"{where}:{n + 1}", f"compressed data cut short or damaged ({exc})")
    except OSError as exc:
        raise InputError(f"{where}: read failed after line {n}: {exc}") from exc
    finally:
        if name != STDIN:
            raw.close()


def cloudwatch_events(
    group: str,
    stream_prefix: str | None,
    since: str | None,
    until: str | None,
    *,
    page_size: int | None = None,
    client: Any = None,
) -> Iterator[tuple[str, bytes]]:
    """(location, message) of the events of ``group`` that may hold audit records.

    Pages through ``FilterLogEvents`` with boto3's paginator (``page_size``
    sets the ``limit`` of each call; the service's default is up to 10,000
    events or 1 MB per page).  The region and credentials come from the usual
    places (``AWS_REGION``, ``AWS_PROFILE``, the instance or pod role); the
    endpoint from ``AWS_ENDPOINT_URL_LOGS`` when set (boto3's service-specific
    endpoint variable).  Raises ``InputError`` when the group cannot be read.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"--cloudwatch-log-group {group}"
    try:
        if client is None:
            # botocore reads AWS_DEFAULT_REGION and the profile; AWS_REGION (set
            # in EKS pods, and what `serve` reads) is taken when those are empty.
            session = boto3.session.Session()
            region = session.region_name or os.environ.get("AWS_REGION") or None
            # boto3's own variable for this service is AWS_ENDPOINT_URL_CLOUDWATCH_LOGS
            # (named after the service id "CloudWatch Logs"; boto3 "Service-specific
            # endpoints") and needs nothing here.  AWS_ENDPOINT_URL_LOGS, the
            # spelling after the API prefix that the project's docs use, is
            # honoured too when the standard one is not set.
            endpoint = None
            if not os.environ.get("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"):
                endpoint = os.environ.get("AWS_ENDPOINT_URL_LOGS") or None
            client = session.client("logs", region_name=region, endpoint_url=endpoint)
        logs = client
        args: dict[str, Any] = {
            "logGroupName": group,
            "filterPattern": CLOUDWATCH_PATTERN,
            # Ignored by the service since 2019 (it always interleaves the
            # streams by time); moto still needs it to merge streams in order.
            "interleaved": True,
        }
        if stream_prefix:
            args["logStreamNamePrefix"] = stream_prefix
        if since is not None:
            args["startTime"] = max(int(q.epoch(since) * 1000) - START_SLACK_MS, 0)
        if until is not None:
            args["endTime"] = int(q.epoch(until) * 1000) + END_SLACK_MS
        pages = logs.get_paginator("filter_log_events").paginate(
            **args, PaginationConfig={"PageSize": page_size} if page_size else {}
        )
        for page in pages:
            for event in page.get("events", ()):
                stream = str(event.get("logStreamName", ""))
                # The service applies the prefix; moto (5.2) ignores it, so it is
                # checked here too (a no-op against the real service).
                if stream_prefix and not stream.startswith(stream_prefix):
                    continue
                message = event.get("message")
                if isinstance(message, str):
                    yield f"{group}/{stream}@{event.get('timestamp')}", message.encode()
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, msg = err.get("Code", "?"), err.get("Message", "")
        if code == "ResourceNotFoundException":
            raise InputError(f"{where}: no such log group ({msg})") from exc
        raise InputError(f"{where}: {code}: {msg}") from exc
    except BotoCoreError as exc:
        raise InputError(f"{where}: {exc} (check AWS_REGION and the credentials)") from exc


def cloudwatch_hits(
    scanner: q.Scanner, events: Iterable[tuple[str, bytes]], problems: Problems
) -> Iterator[q.Hit]:
    scan = scanner.scan
    for where, message in events:
        r = scan(message)
        if r is None:
            continue
        if isinstance(r, str):
            problems.add(where, r)
            continue
        yield r


# --------------------------------------------------------------------- the command


@dataclass(frozen=True)
class Query:
    sources: tuple[str, ...]
    filters: q.Filters
    output: str = "table"  # or "json"
    summary: bool = False
    log_group: str | None = None
    stream_prefix: str | None = None
    page_size: int | None = None


def check(query: Query) -> None:
    """Usage errors (``ConfigError``, exit 2) that flags alone cannot express."""
    if not query.sources and not query.log_group:
        raise ConfigError(
            "no source: give audit files or directories, - for stdin, or --cloudwatch-log-group"
        )
    if query.stream_prefix and not query.log_group:
        raise ConfigError("--log-stream-prefix needs --cloudwatch-log-group")


def hits(query: Query, scanner: q.Scanner, problems: Problems) -> Iterator[q.Hit]:
    """All matching records, merged in time order across sources."""
    streams: list[Iterator[q.Hit]] = [
        file_hits(scanner, name, problems) for name in expand(query.sources)
    ]
    if query.log_group:
        f = query.filters
        events = cloudwatch_events(query.log_group, query.stream_prefix, f.since, f.until,
                                   page_size=query.page_size)  # fmt: skip
        streams.append(cloudwatch_hits(scanner, events, problems))
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=attrgetter("ts"))


def run(query: Query, out: IO[bytes], err: IO[str]) -> int:
    """Run the query; 0 when records matched, 1 when none did.  Raises EcrWebhookError."""
    check(query)
    scanner = q.Scanner(query.filters)
    problems = Problems()
    stream = hits(query, scanner, problems)
    try:
        if query.summary:
            summary = q.Summary()
            for hit in stream:
                summary.add(hit)
            if query.output == "json":
                doc = summary.as_json(scanner.counts)
                out.write(json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n")
            else:
                out.write(("\n".join(q.render_summary(summary)) + "\n").encode())
        elif query.output == "json":
            write = out.write
            for hit in stream:
                write(hit.raw + b"\n")
        else:
            table = q.TableRenderer(query.filters.by_container)
            decisions: dict[str, int] = {}
            for hit in stream:
                d = str(hit.record.get("decision"))
                decisions[d] = decisions.get(d, 0) + 1
                lines = table.render(hit)
                if lines:
                    out.write(("\n".join(lines) + "\n").encode())
            footer = q.table_footer(scanner.counts.matched, table.rows, table.silent, decisions)
            out.write((footer + "\n").encode())
        out.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other filters do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    notes = q.corrupt_note(scanner.counts)
    if notes:
        examples = problems.examples + (
            [f"  ... and {problems.hidden} more"] if problems.hidden else []
        )
        err.write("\n".join(notes + examples) + "\n")
    return 0 if scanner.counts.matched else 1
