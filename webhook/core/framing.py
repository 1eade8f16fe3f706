"""Where an HTTP/1.1 request ends, from the bytes received so far.  Pure: no I/O.

The server's worker reads a request in its poller, without a thread, until
``RequestScanner.scan`` says it is whole; only then does a thread serve it
(``webhook.server.WebhookWorker``).  The scanner therefore answers one
question, cheaply and incrementally: *is the request in ``buf`` complete?*
It does not validate the request: gunicorn's own parser does that in the
thread, and a request the scanner cannot frame is handed over as it is
(``Frame.HAND_OVER``) so that gunicorn answers it (400, ...).

Framing follows RFC 9112 section 6: a request with ``Transfer-Encoding``
(whose last coding is ``chunked``) ends after the last chunk and the trailer
section; otherwise ``Content-Length`` gives the body length; otherwise there is
no body.  A request whose body is known to exceed ``max_body`` is
``Frame.TOO_LARGE`` as soon as that is known (a declared ``Content-Length``, a
chunk size, or the chunks so far), and ``refusal`` says why: the worker answers
413 itself, from its poller, without the body ever being buffered and without
a thread.  A thread would have to read the rest through gunicorn's body
readers, whose ``read(n)`` waits for ``n`` bytes, so a client trickling an
oversized body a byte at a time could hold it for as long as it liked.
"""

from __future__ import annotations

import enum

HEADER_END = b"\r\n\r\n"
CRLF = b"\r\n"


class Frame(enum.Enum):
    NEED_MORE = "need-more"  # keep reading
    COMPLETE = "complete"  # the whole request is in the buffer
    HAND_OVER = "hand-over"  # not framable: let gunicorn's parser answer (400)
    TOO_LARGE = "too-large"  # the body is over max_body: the worker answers 413


class RequestScanner:
    """Incremental framing of one request; ``reset()`` before the next one.

    ``scan(buf)`` is called with the whole buffer received so far (it only
    grows between calls) and resumes where the previous call stopped, so a
    body arriving in many small pieces costs linear time in total.
    """

    # A header section is handed over only when it is larger than anything
    # gunicorn's parser accepts (limit_request_line 4094 + limit_request_fields
    # 100 x limit_request_field_size 8190, about 820 KB, gunicorn's defaults),
    # so the thread that gets it finds gunicorn's limit already crossed in the
    # bytes at hand and answers 400 at once.  A smaller limit handed gunicorn a
    # half-read header section, which it then read on a thread, a byte now and
    # then, for as long as the client liked.
    MAX_HEADER = 1024 * 1024

    def __init__(self, max_body: int, max_header: int = MAX_HEADER) -> None:
        self.max_body = max_body
        self.max_header = max_header
        self.reset()

    def reset(self) -> None:
        self.end: int | None = None  # index just past the request, once COMPLETE
        self.refusal = ""  # why, once TOO_LARGE (the message of the 413's Status)
        self._body_start: int | None = None
        self._length: int | None = None  # Content-Length
        self._chunked = False
        self._pos = 0  # chunked: next chunk-size line; headers: where to search from
        self._body_total = 0  # chunked: data bytes so far
        self._in_trailers = False

    def scan(self, buf: bytes | bytearray) -> Frame:
        if self._body_start is None:
            found = buf.find(HEADER_END, max(0, self._pos - 3))
            if found < 0:
                self._pos = len(buf)
                return Frame.HAND_OVER if len(buf) > self.max_header else Frame.NEED_MORE
            self._body_start = found + 4
            verdict = self._read_headers(bytes(buf[:found]))
            if verdict is not None:
                return verdict
            self._pos = self._body_start
        if self._chunked:
            return self._scan_chunked(buf)
        assert self._length is not None  # nosec B101  # set with the headers; mypy narrowing
        if len(buf) >= self._body_start + self._length:
            self.end = self._body_start + self._length
            return Frame.COMPLETE
        return Frame.NEED_MORE

    def _read_headers(self, head: bytes) -> Frame | None:
        lines = head.split(CRLF)
        while lines and not lines[0]:  # RFC 9112 2.2: ignore empty lines before a request
            lines.pop(0)
        lengths: list[str] = []
        codings: list[str] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return Frame.HAND_OVER  # malformed: gunicorn answers 400
            key = name.strip().lower()
            if key == b"content-length":
                lengths.append(value.strip().decode("latin-1"))
            elif key == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.decode("latin-1").split(",")]
        if codings:
            if codings[-1] != "chunked" or lengths:
                return Frame.HAND_OVER  # RFC 9112 6.1/6.3: gunicorn refuses these
            self._chunked = True
            return None
        if not lengths:
            self._length = 0
            return None
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
            return Frame.HAND_OVER
        self._length = int(lengths[0])
        if self._length > self.max_body:
            self.refusal = f"body of {self._length} bytes is over the limit of {self.max_body}"
            return Frame.TOO_LARGE
        return None

    def _scan_chunked(self, buf: bytes | bytearray) -> Frame:
        while True:
            eol = buf.find(CRLF, self._pos)
            if eol < 0:
                # A size line or trailer field longer than a header could be.
                return Frame.HAND_OVER if len(buf) - self._pos > self.max_header \
                    else Frame.NEED_MORE  # fmt: skip
            line = bytes(buf[self._pos:eol])
            if self._in_trailers:
                self._pos = eol + 2
                if not line:  # the empty line that ends the trailer section
                    self.end = self._pos
                    return Frame.COMPLETE
                continue
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                return Frame.HAND_OVER
            if size < 0 or not size_text.isalnum():
                return Frame.HAND_OVER
            if size == 0:
                self._in_trailers = True
                self._pos = eol + 2
                continue
            if self._body_total + size > self.max_body:
                self.refusal = f"chunked body is over the limit of {self.max_body} bytes"
                return Frame.TOO_LARGE
            data_end = eol + 2 + size
            if len(buf) < data_end + 2:
                return Frame.NEED_MORE  # resumes at this size line next time
            if buf[data_end:data_end + 2] != CRLF:
                return Frame.HAND_OVER
            self._body_total += size
            self._pos = data_end + 2
