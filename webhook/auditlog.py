"""Writing audit records: one JSON line per admission.  A shell module.

The records themselves are built by the pure ``webhook.core.audit``; this module
only puts them somewhere, with two guarantees that hold across gunicorn worker
processes and their threads:

* **No record is lost**, so the number of records equals the number of
  admissions answered.  A failed write raises ``AuditLost``, which says how
  many records it lost, and the caller counts them.
* **No record is interleaved with another.**  Each record is encoded first
  and written with a single ``write(2)``:

  - to a regular file opened with ``O_APPEND``, Linux positions and writes
    each ``write`` atomically (the inode lock is held for the whole call), so
    concurrent records from any number of processes never mix;
  - to a pipe (stdout in a container), POSIX makes a write of at most
    ``PIPE_BUF`` bytes (4096 on Linux, pipe(7)) atomic.  A longer record (a pod
    with many containers) is written under a lock instead: a thread lock plus
    an ``fcntl.flock`` on a lock file shared by the workers.

  Holding a lock on the common path would be correct too, but slow: a thread
  woken from ``flock`` must then wait for the GIL (up to the 5 ms switch
  interval) while still holding the lock, and every other writer of every
  worker queues behind it (measured with hey: 1100 instead of 3800 requests
  per second with a lock around every write).

Targets:

* ``-``: standard output (the container log), which then carries nothing but
  audit records; operational logs go to stderr.
* a file path: appended to, and rotated by size like ``RotatingFileHandler``
  (``file`` -> ``file.1`` -> ... -> ``file.N``, the oldest dropped).  One
  worker rotates at a time (``flock`` on ``<file>.lock``, non-blocking: a
  worker that finds a rotation under way just goes on).  A writer checks,
  at most every ``RECHECK_SECONDS`` (50 ms), that its descriptor still names
  the file at the path, and reopens it if another worker rotated; records
  written in between land at the end of ``file.1``, where they are kept, never
  lost (after its own rotation a worker reopens at once).  Between checks the
  size is the last one seen plus what this worker wrote since, so a file may
  pass ``max_bytes`` by what the other workers wrote in 50 ms before it is
  rotated.  Why not a ``stat`` per record: it is a system call on every
  admission, and each one lets the GIL go to another thread, which the writer
  then waits for (bench/auditwrite.py, four threads: 10-11 us of CPU per
  record with a ``stat`` each, 6-7 us without).  As with
  ``RotatingFileHandler``, ``max_bytes`` or ``backups`` of 0 disables rotation.

A full disk (ENOSPC, EDQUOT) or an I/O error makes ``write`` raise; the server
keeps answering, counts the lost record and reports it on stderr, rate-limited
(``webhook.app``).  Linux writes what fits before failing (a regular file's
``write`` returns a short count, the next one ENOSPC), which would leave a torn
record that the next record, once space is freed, would be glued to.  So a
writer that fails part way cuts its own fragment off again (``ftruncate`` to
where it started, only when the file still ends with that fragment): the file
holds whole lines only, before, during and after the disk is full.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from webhook.core import jsonc

STDOUT = "-"
RECHECK_SECONDS = 0.05  # how stale a writer's view of a rotated file may be
# A deferred record (AuditLog.write) waits for at most this many records, or
# this long, before a write takes the queue.
DEFER_RECORDS = 32
DEFER_SECONDS = 0.01
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


def _take_all(queue: deque[bytes]) -> list[bytes]:
    """Everything in ``queue`` now, each item popped (atomic) so none is lost to a race."""
    taken: list[bytes] = []
    try:
        while True:
            taken.append(queue.popleft())
    except IndexError:
        return taken


def _pieces(records: list[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """``records`` joined into pieces of at most ``limit`` bytes each, a record
    never split, with the number of records in each; a record longer than
    ``limit`` is a piece of its own."""
    piece: list[bytes] = []
    size = 0
    for record in records:
        if piece and size + len(record) > limit:
            yield b"".join(piece), len(piece)
            piece, size = [], 0
        piece.append(record)
        size += len(record)
    if piece:
        yield b"".join(piece), len(piece)


class AuditLost(OSError):
    """Records that could not be written: ``lost`` of them, for the errno of ``cause``."""

    def __init__(self, lost: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.lost = lost
        self.cause = cause


class AuditSink(Protocol):
    def write(self, record: Mapping[str, Any], *, defer: bool = False) -> None: ...
    def flush(self, wait: bool = False) -> None: ...
    def pending(self) -> bool: ...


def encode(record: Mapping[str, Any]) -> bytes:
    """One record as one line of compact JSON (no newline inside: JSON escapes it)."""
    return jsonc.dumps(record) + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_whole(fd: int, data: bytes) -> None:
    """``_write_all`` to an ``O_APPEND`` file; a failure leaves no fragment behind.

    With ``O_APPEND`` the file offset after a write is the end of what it wrote,
    so the fragment is ``[end - written, end)``.  It is cut only while it is
    still the file's tail: another writer's later record is never touched (the
    check and the cut are not atomic, but a record racing them needs free space
    in the microseconds after this write found none).
    """
    view = memoryview(data)
    written = 0
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            if written:
                end = os.lseek(fd, 0, os.SEEK_CUR)
                if os.fstat(fd).st_size == end:
                    os.ftruncate(fd, end - written)
            raise
        written += n
        view = view[n:]


class AuditLog:
    """An audit sink writing to stdout or to a size-rotated file.

    ``lock_file`` is the inter-process lock; for a file target it defaults to
    ``<path>.lock``.  For stdout the launcher passes a lock file in its runtime
    directory; without one (a single process, as in tests) only the thread lock
    is used.
    """

    def __init__(
        self,
        target: str = STDOUT,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        backups: int = 5,
        lock_file: str | None = None,
        recheck_seconds: float = RECHECK_SECONDS,
    ) -> None:
        self.target = target
        self.recheck_seconds = recheck_seconds
        self.max_bytes = max_bytes
        self.backups = backups
        self._thread_lock = threading.Lock()
        # Writes combine (see write()): records waiting, and the lock of the one
        # thread that writes them.  A deque, never replaced: its append and
        # popleft are atomic.  (Swapping a list for an empty one lost records: a
        # thread could load the old list, be switched out, and append to it after
        # the writer had taken it.)
        self._queue: deque[bytes] = deque()
        self._queued_at = 0.0  # monotonic time when the queue last went from empty
        self._combining = threading.Lock()
        # The file's descriptor, used only by the thread holding _combining, so
        # one replaced after a rotation can be closed at once.
        self._fd: int | None = None
        self._ino: int | None = None
        self._size = 0  # the file's size at the last stat, plus what was written since
        self._recheck_at = 0.0  # monotonic time of the next stat of the path
        if lock_file is None and target != STDOUT:
            lock_file = target + ".lock"
        self._lock_fd = (
            os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if lock_file is not None
            else None
        )

    @property
    def rotates(self) -> bool:
        return self.target != STDOUT and self.max_bytes > 0 and self.backups > 0

    def write(self, record: Mapping[str, Any], *, defer: bool = False) -> None:
        """Write one record, with those of other threads queued meanwhile.

        Raises ``AuditLost`` (an OSError that says how many records it lost)
        when they cannot be written.

        ``defer``: the caller knows that a ``write`` or a ``flush`` of this
        sink follows soon (``serve``: another admission of this worker is in
        progress, and the last one to finish flushes).  The record may then
        wait in the queue, for at most ``DEFER_RECORDS`` records or
        ``DEFER_SECONDS``, and be written with later ones in one system call.
        A record of an admission answered while no other is in progress is
        written before ``write`` returns.  See ``flush`` for how threads
        combine their writes.
        """
        if not self._queue:
            self._queued_at = time.monotonic()
        self._queue.append(encode(record))
        if (defer and len(self._queue) < DEFER_RECORDS
                and time.monotonic() - self._queued_at < DEFER_SECONDS):  # fmt: skip
            return
        self.flush()

    def pending(self) -> bool:
        """Whether records wait in the queue (deferred, or queued by a thread just now)."""
        return bool(self._queue)

    def flush(self, wait: bool = False) -> None:
        """Write the queued records; raises ``AuditLost`` like ``write``.

        ``wait``: when another thread is writing, wait for it and then write
        what is left, rather than leave it to that thread (at exit: a daemon
        thread's write may never finish).

        Threads combine their writes: the thread that finds no write under way
        writes the whole queue in one ``write(2)`` (stdout: in pieces of at
        most ``PIPE_BUF``), again until the queue is empty; a thread that finds
        a write under way leaves its records to that writer and returns at
        once.  Under load, one system call carries the records of several
        admissions, and threads no longer take turns at the GIL around a system
        call each (bench/auditwrite.py, four threads writing at once: 55-69 us
        of CPU per record with a write each, 10-11 us combined).  A record may
        then be written a little after its admission is answered, by another
        thread: a worker killed with SIGKILL in that window loses those records
        (a graceful stop loses none: the last admission flushes).
        """
        while self._queue:
            if not self._combining.acquire(blocking=wait):
                return  # the thread writing now takes these records with its own
            try:
                while self._queue:
                    batch = _take_all(self._queue)
                    try:
                        self._write_batch(batch)
                    except AuditLost:
                        raise
                    except OSError as exc:
                        raise AuditLost(len(batch), exc) from exc
            finally:
                self._combining.release()
            # A record queued after the last batch was taken, by a thread that
            # found this one writing, is written on the next turn of the loop.

    def _write_batch(self, records: list[bytes]) -> None:
        """Whole records, in one write where the target allows."""
        if self.target == STDOUT:
            # A pipe write of at most PIPE_BUF bytes is atomic: records are
            # sent in pieces that fit, each without a lock; only a record
            # longer than PIPE_BUF on its own needs the lock.
            written = 0
            for piece, count in _pieces(records, PIPE_BUF):
                try:
                    if len(piece) <= PIPE_BUF:
                        _write_all(1, piece)
                    else:
                        with self._locked():
                            _write_all(1, piece)
                except OSError as exc:  # the pieces before this one are out
                    raise AuditLost(len(records) - written, exc) from exc
                written += count
            return
        data = b"".join(records)
        fd, size = self._current_fd(len(data))
        _write_whole(fd, data)
        if self.rotates and size + len(data) >= self.max_bytes:
            self._rotate()

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        """Hold the thread lock and the inter-process lock; yields whether it got them."""
        if not self._thread_lock.acquire(blocking):
            yield False
            return
        try:
            if self._lock_fd is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
            try:
                yield True
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _current_fd(self, nbytes: int) -> tuple[int, int]:
        """The descriptor of the file now at ``target`` (reopened after a rotation,
        checked at most every ``RECHECK_SECONDS``) and that file's size before
        this write of ``nbytes``.  Called by the thread holding ``_combining``.

        Records written between another worker's rename and this reopen land at
        the end of ``target.1``: nothing is lost, and each record is still one
        whole line.
        """
        now = time.monotonic()
        if self._fd is not None and now < self._recheck_at:
            size, self._size = self._size, self._size + nbytes
            return self._fd, size
        try:
            st: os.stat_result | None = os.stat(self.target)
        except FileNotFoundError:
            st = None
        if self._fd is None or st is None or st.st_ino != self._ino:
            new = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                          0o640)  # fmt: skip
            if self._fd is not None:
                os.close(self._fd)
            st = os.fstat(new)
            self._fd, self._ino = new, st.st_ino
        self._size, self._recheck_at = st.st_size + nbytes, now + self.recheck_seconds
        return self._fd, st.st_size

    def _rotate(self) -> None:
        with self._locked(blocking=False) as got:
            if not got:
                return  # another thread or worker is rotating
            try:
                if os.stat(self.target).st_size < self.max_bytes:
                    return  # rotated already by another worker
            except FileNotFoundError:
                return
            # Shift only the backups that exist (file.1 .. file.n-1), quickly:
            # writers keep appending to the full file until the last rename.
            n = 1
            while n <= self.backups and os.path.exists(f"{self.target}.{n}"):
                n += 1
            for i in range(min(n, self.backups) - 1, 0, -1):
                os.replace(f"{self.target}.{i}", f"{self.target}.{i + 1}")
            os.replace(self.target, f"{self.target}.1")
            self._recheck_at = 0.0  # this worker's next record opens the new file

    def close(self) -> None:
        """Write what is queued (raises ``AuditLost`` like ``write``), then close."""
        try:
            self.flush(wait=True)
        finally:
            self._close()

    def _close(self) -> None:
        with self._combining, self._thread_lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None

    def files(self) -> list[str]:
        """The current file and its backups, newest first (for tests and tools)."""
        if self.target == STDOUT:
            return []
        names = [self.target] + [f"{self.target}.{i}" for i in range(1, self.backups + 1)]
        return [n for n in names if os.path.exists(n)]
