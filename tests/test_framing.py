"""webhook.core.framing: where a request ends, fed the bytes as they arrive."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.core.framing import Frame, RequestScanner

HEAD = b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def feed(scanner: RequestScanner, data: bytes, step: int) -> tuple[Frame, int]:
    """Feed ``data`` ``step`` bytes at a time; (verdict, bytes fed when it stopped)."""
    buf = bytearray()
    verdict = Frame.NEED_MORE
    for i in range(0, len(data), step):
        buf += data[i:i + step]
        verdict = scanner.scan(buf)
        if verdict is not Frame.NEED_MORE:
            return verdict, len(buf)
    return verdict, len(buf)


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"  # fmt: skip


@given(st.binary(max_size=3000), st.integers(1, 700), st.integers(1, 500))
def test_content_length_and_chunked_requests_end_exactly_where_they_end(
    body: bytes, step: int, chunk: int
) -> None:
    by_length = HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    by_chunks = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, chunk)
    for request in (by_length, by_chunks):
        scanner = RequestScanner(max_body=10_000)
        verdict, _ = feed(scanner, request + b"GET / HTTP/1.1\r\n\r\n", step)
        assert verdict is Frame.COMPLETE
        assert scanner.end == len(request)
        # Nothing short of the whole request is complete.
        scanner = RequestScanner(max_body=10_000)
        assert feed(scanner, request[:-1], step)[0] is Frame.NEED_MORE


def test_no_body_and_trailers() -> None:
    s = RequestScanner(max_body=100)
    assert s.scan(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") is Frame.COMPLETE
    s = RequestScanner(max_body=100)
    req = HEAD + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    assert s.scan(req) is Frame.COMPLETE and s.end == len(req)


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEAD + b"Content-Length: -1\r\n\r\n",
        HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX",
        HEAD + b"no colon\r\n\r\n",
        # a header section that never ends, past what gunicorn parses
        b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * (RequestScanner.MAX_HEADER + 1),
    ],
    ids=["negative", "conflicting", "not-chunked", "both", "bad-size", "bad-crlf",
         "bad-field", "endless-header"],
)  # fmt: skip
def test_what_cannot_be_framed_is_handed_over(request_bytes: bytes) -> None:
    assert RequestScanner(max_body=100).scan(request_bytes) is Frame.HAND_OVER


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (HEAD + b"Content-Length: 101\r\n\r\n", "body of 101 bytes is over the limit of 100"),
        # the first chunk fits, the second announces more than the limit allows
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n40\r\n",
         "chunked body is over the limit of 100 bytes"),
        # one chunk size over the limit, before any of its data
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n4000000\r\n",
         "chunked body is over the limit of 100 bytes"),
    ],
    ids=["length-over", "chunked-over", "huge-chunk"],
)  # fmt: skip
def test_a_body_known_to_be_over_the_limit_is_too_large_before_it_arrives(
    request_bytes: bytes, why: str
) -> None:
    """The worker answers these 413 itself, with ``refusal`` as the Status message."""
    scanner = RequestScanner(max_body=100)
    assert scanner.scan(request_bytes) is Frame.TOO_LARGE
    assert scanner.refusal == why
    scanner.reset()
    assert scanner.refusal == ""


def test_a_body_at_the_limit_is_not_too_large() -> None:
    scanner = RequestScanner(max_body=100)
    request = HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 100
    assert scanner.scan(request) is Frame.COMPLETE
    scanner = RequestScanner(max_body=100)
    request = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 100, 30)
    assert scanner.scan(request) is Frame.COMPLETE


def test_the_chunked_limit_is_not_counted_twice_across_calls() -> None:
    s = RequestScanner(max_body=64)
    buf = bytearray(HEAD + b"Transfer-Encoding: chunked\r\n\r\n40\r\n")
    for _ in range(64):
        buf += b"x"
        assert s.scan(buf) is Frame.NEED_MORE
    buf += b"\r\n0\r\n\r\n"
    assert s.scan(buf) is Frame.COMPLETE
