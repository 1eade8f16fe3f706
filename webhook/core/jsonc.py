"""Compact JSON on the request path: orjson, with the standard library as the fallback.  Pure.

Measured on the aws-node review (bench/load.py's body, 3.7 KB): encoding the
whole document takes 76 us with ``json.dumps`` and 2.5 us with ``orjson``;
decoding 26 us and 19 us.  The admission path encodes four documents per
request (the patch, the answer, the audit record, the originals annotation)
and decodes one.

orjson refuses a few things that are valid JSON and that ``json`` accepts:
integers beyond 64 bits, lone UTF-16 surrogates in strings, ``NaN`` (not
JSON, but ``json`` reads it), non-string keys on encoding.  A request must not
be answered differently because of the library, so those cases fall back to
``json`` (decoding: the input is decoded again; an invalid body then raises
``ValueError`` as before).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8 (non-ASCII characters as themselves, not ``\\u`` escapes)."""
    try:
        return orjson.dumps(obj, default=str)
    except TypeError:  # orjson.JSONEncodeError: huge integers, surrogates, odd keys
        return json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )


def loads(raw: bytes | str) -> Any:
    """Decode JSON; raises ValueError (or RecursionError) when ``raw`` is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
