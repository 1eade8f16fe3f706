"""The audit writer under real concurrency: processes, threads, rotation, pipes.

gunicorn runs the app in forked worker processes with threads; these tests do
the same with ``multiprocessing`` (fork) and threads, and check that every
record arrives exactly once and whole.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from webhook import auditlog
from webhook.auditlog import (
    DEFER_RECORDS,
    DEFER_SECONDS,
    PIPE_BUF,
    RECHECK_SECONDS,
    AuditLog,
    _pieces,
)


def _writer(target: str, proc: int, threads: int, per_thread: int, max_bytes: int,
            pad: int, recheck: float) -> None:  # fmt: skip
    log = AuditLog(target, max_bytes=max_bytes, backups=10_000, recheck_seconds=recheck)

    def run(t: int) -> None:
        for i in range(per_thread):
            log.write({"kind": "EcrWebhookAudit", "auditID": f"{proc}-{t}-{i}", "pad": "x" * pad})

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.close()


def _read_all(base: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for f in base.parent.iterdir():
        if f.name.startswith(base.name) and not f.name.endswith(".lock"):
            out.extend(json.loads(line) for line in f.read_text().splitlines())
    return out


@pytest.mark.parametrize("recheck", [0.0, RECHECK_SECONDS], ids=["recheck-always", "recheck-50ms"])
@pytest.mark.parametrize("pad", [200, 6000], ids=["small-records", "records-over-pipe-buf"])
def test_processes_and_threads_lose_and_mix_nothing_across_rotations(
    tmp_path: Path, pad: int, recheck: float
) -> None:
    """Rechecking the path before every write makes this short run rotate many
    times; with the server's 50 ms, writers also go on into a rotated file."""
    target = tmp_path / "audit.log"
    procs, threads, per_thread = 4, 3, 150
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(target), p, threads, per_thread, 32 * 1024,
                                                 pad, recheck)) for p in range(procs)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    records = _read_all(target)  # every line parses: nothing torn or interleaved
    ids = [r["auditID"] for r in records]
    expected = {f"{p}-{t}-{i}" for p in range(procs) for t in range(threads)
                for i in range(per_thread)}  # fmt: skip
    assert len(ids) == len(expected)
    assert set(ids) == expected
    # it did rotate (many times when rechecking always); the lock file is one of them
    assert len(list(tmp_path.glob("audit.log.*"))) > (5 if recheck == 0 else 2)


def test_rotation_keeps_n_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.log"), max_bytes=100, backups=2)
    for i in range(10):
        log.write({"auditID": i, "pad": "x" * 100})
    assert log.files() == [str(tmp_path / n) for n in ("a.log.1", "a.log.2")]
    # Each record fills a file: the newest two survive, one per backup.
    assert json.loads((tmp_path / "a.log.1").read_text())["auditID"] == 9
    assert json.loads((tmp_path / "a.log.2").read_text())["auditID"] == 8
    log.close()


def test_zero_max_bytes_never_rotates(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.log"), max_bytes=0, backups=3)
    for i in range(50):
        log.write({"auditID": i})
    assert log.files() == [str(tmp_path / "a.log")]
    assert len((tmp_path / "a.log").read_text().splitlines()) == 50
    log.close()


STDOUT_WRITERS = """
import sys, threading, multiprocessing
from webhook.auditlog import AuditLog
lock, pad, defer = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "defer"
def proc(p):
    log = AuditLog("-", lock_file=lock)
    def run(t):
        for i in range(100):
            log.write({"auditID": f"{p}-{t}-{i}", "pad": "y" * pad}, defer=defer)
    ts = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    [t.start() for t in ts]; [t.join() for t in ts]
    log.close()
ps = [multiprocessing.get_context("fork").Process(target=proc, args=(p,)) for p in range(4)]
[p.start() for p in ps]; [p.join() for p in ps]
"""


@pytest.mark.parametrize("defer", ["now", "defer"])
@pytest.mark.parametrize("pad", [100, 1500, 3 * PIPE_BUF],
                         ids=["small", "two-per-pipe-buf", "over-pipe-buf"])  # fmt: skip
def test_stdout_pipe_records_are_whole(tmp_path: Path, pad: int, defer: str) -> None:
    """Four processes of three threads write to one pipe, as workers share a container log;
    deferred, records go out in batches, in pieces of at most PIPE_BUF."""
    result = subprocess.run(
        [sys.executable, "-c", STDOUT_WRITERS, str(tmp_path / "audit.lock"), str(pad), defer],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    lines = result.stdout.decode().splitlines()
    ids = [json.loads(line)["auditID"] for line in lines]
    assert len(ids) == 4 * 3 * 100
    assert len(set(ids)) == len(ids)


def test_threads_writing_through_rotations_lose_nothing_and_leak_no_descriptor(
    tmp_path: Path,
) -> None:
    """Descriptors replaced after a rotation are closed (one thread at a time writes)."""

    fds_before = len(os.listdir("/proc/self/fd"))
    log = AuditLog(str(tmp_path / "audit.log"), max_bytes=4096, backups=1000)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(300):
                log.write({"auditID": f"{t}-{i}", "pad": "x" * 100})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert len(log.files()) > 10  # it rotated many times
    ids = [json.loads(line)["auditID"] for f in log.files()
           for line in Path(f).read_text().splitlines()]  # fmt: skip
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(8) for i in range(300))
    # every replaced descriptor closed: only the current file's and the lock file's are open
    assert len(os.listdir("/proc/self/fd")) == fds_before + 2
    log.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_records_queued_while_a_write_is_under_way_go_out_with_the_next_one(
    tmp_path: Path,
) -> None:
    """Writes combine: while one thread is in ``write(2)``, other threads queue their
    record and return at once, and the writing thread writes the queue next, in
    one system call.  A FIFO whose buffer is full holds the first write for as
    long as the test likes; the reader then sees every record, whole, once."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = AuditLog(str(fifo), max_bytes=0)
    filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:  # fill the pipe: the next write blocks
            try:
                os.write(filler, b"\n" * 4096)
            except BlockingIOError:
                break
        first = threading.Thread(target=log.write, args=({"uid": "first"},))
        first.start()
        while not log._combining.locked():  # the first write is under way
            first.join(0.01)
        others = [threading.Thread(target=log.write, args=({"uid": f"other-{i}"},))
                  for i in range(3)]  # fmt: skip
        for t in others:
            t.start()
        for t in others:
            t.join(5)
            assert not t.is_alive(), "a queued record waited for the blocked write"
        assert first.is_alive()  # still blocked: the three were only queued
        os.set_blocking(reader, True)
        data = b""
        while data.count(b"}\n") < 4:
            data += os.read(reader, 65536)
        first.join(5)
        assert not first.is_alive()
    finally:
        os.close(filler)
        os.close(reader)
        log.close()
    records = [json.loads(line) for line in data.splitlines() if line.strip()]
    assert sorted(r["uid"] for r in records) == ["first", "other-0", "other-1", "other-2"]


def test_a_failed_batch_says_how_many_records_it_lost(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC; the exception counts the records."""
    from webhook.auditlog import AuditLost

    log = AuditLog("/dev/full", max_bytes=0)
    log._queue.extend([b"{}\n", b"{}\n"])  # two records left by other threads
    with pytest.raises(AuditLost) as caught:
        log.write({"uid": "mine"})
    assert caught.value.lost == 3
    assert caught.value.errno == 28  # ENOSPC
    log.close()


def test_pieces_keep_records_whole_in_order_and_within_the_limit() -> None:
    records = [b"a" * n + b"\n" for n in (10, 4000, 50, 5000, 20, 20, 4095, 1)]
    pieces = [piece for piece, _ in _pieces(records, PIPE_BUF)]
    assert b"".join(pieces) == b"".join(records)
    assert [count for _, count in _pieces(records, PIPE_BUF)] == [3, 1, 2, 1, 1]
    for piece in pieces:
        # Over the limit only as a record of its own.
        assert len(piece) <= PIPE_BUF or piece in records
        assert piece.endswith(b"\n")
    # 11+4001+51 bytes | 5001 | 21+21 | 4096 (exactly PIPE_BUF; +2 would pass it) | 2
    assert [len(p) for p in pieces] == [4063, 5001, 42, 4096, 2]
    assert list(_pieces([], PIPE_BUF)) == []


def test_deferred_records_wait_for_a_write_a_flush_or_the_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Time is taken out of the count part (a loaded machine may take 10 ms for
    # 32 writes), and put back for the age part.
    monkeypatch.setattr(auditlog, "DEFER_SECONDS", 3600.0)
    target = tmp_path / "a.log"
    log = AuditLog(str(target))

    def lines() -> int:
        return len(target.read_text().splitlines()) if target.exists() else 0

    log.write({"auditID": "0"}, defer=True)
    assert lines() == 0 and log.pending()
    log.write({"auditID": "1"})  # not deferred: takes the queue with it
    assert lines() == 2 and not log.pending()
    for i in range(DEFER_RECORDS - 1):
        log.write({"auditID": f"n{i}"}, defer=True)
    assert lines() == 2
    log.write({"auditID": "last"}, defer=True)  # the DEFER_RECORDS-th: written with the rest
    assert lines() == 2 + DEFER_RECORDS and not log.pending()
    monkeypatch.setattr(auditlog, "DEFER_SECONDS", DEFER_SECONDS)
    log.write({"auditID": "old"}, defer=True)
    time.sleep(DEFER_SECONDS * 2)
    log.write({"auditID": "new"}, defer=True)  # the first waited long enough: both go
    assert lines() == 4 + DEFER_RECORDS
    log.write({"auditID": "at-close"}, defer=True)
    log.flush()
    assert lines() == 5 + DEFER_RECORDS
    log.write({"auditID": "closing"}, defer=True)
    log.close()  # writes what is queued
    ids = [json.loads(line)["auditID"] for line in target.read_text().splitlines()]
    assert ids[:2] == ["0", "1"] and ids[-1] == "closing" and len(set(ids)) == len(ids)
