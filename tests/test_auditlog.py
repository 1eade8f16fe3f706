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
from pathlib import Path

import pytest

from webhook.auditlog import PIPE_BUF, AuditLog


def _writer(target: str, proc: int, threads: int, per_thread: int, max_bytes: int,
            pad: int) -> None:  # fmt: skip
    log = AuditLog(target, max_bytes=max_bytes, backups=10_000)

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


@pytest.mark.parametrize("pad", [200, 6000], ids=["small-records", "records-over-pipe-buf"])
def test_processes_and_threads_lose_and_mix_nothing_across_rotations(
    tmp_path: Path, pad: int
) -> None:
    target = tmp_path / "audit.log"
    procs, threads, per_thread = 4, 3, 150
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(target), p, threads, per_thread, 32 * 1024,
                                                 pad)) for p in range(procs)]  # fmt: skip
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
    assert len(list(tmp_path.glob("audit.log.*"))) > 5  # it did rotate, many times


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
lock, pad = sys.argv[1], int(sys.argv[2])
def proc(p):
    log = AuditLog("-", lock_file=lock)
    def run(t):
        for i in range(100):
            log.write({"auditID": f"{p}-{t}-{i}", "pad": "y" * pad})
    ts = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    [t.start() for t in ts]; [t.join() for t in ts]
ps = [multiprocessing.get_context("fork").Process(target=proc, args=(p,)) for p in range(4)]
[p.start() for p in ps]; [p.join() for p in ps]
"""


@pytest.mark.parametrize("pad", [100, 3 * PIPE_BUF], ids=["small", "over-pipe-buf"])
def test_stdout_pipe_records_are_whole(tmp_path: Path, pad: int) -> None:
    """Four processes of three threads write to one pipe, as workers share a container log."""
    result = subprocess.run(
        [sys.executable, "-c", STDOUT_WRITERS, str(tmp_path / "audit.lock"), str(pad)],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    lines = result.stdout.decode().splitlines()
    ids = [json.loads(line)["auditID"] for line in lines]
    assert len(ids) == 4 * 3 * 100
    assert len(set(ids)) == len(ids)


def test_threads_writing_through_rotations_lose_nothing_and_leak_no_descriptor(
    tmp_path: Path,
) -> None:
    """Descriptors replaced after a rotation are closed once no thread writes through them."""

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
    assert log._writers == 0 and log._retired == []  # every replaced descriptor closed
    log.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
