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
from collections.abc import Mapping
from typing import Any

import orjson

# What a decoded JSON object may be, for isinstance: dict first, because the
# check stops there for every object the webhook decodes (19 ns, against 186
# ns for the Mapping ABC alone; CPython 3.11, timeit), and answers the same
# for any other Mapping.
OBJECT = (dict, Mapping)


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


def dumps_sorted(obj: Any) -> str:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"))``, byte for byte, faster.

    For values stored where their exact text matters (the originals
    annotation, a map of strings): orjson when its output is ASCII without
    DEL, which for strings, lists and maps is exactly what ``json`` writes
    (both escape the C0 controls alike); anything else goes to ``json`` itself:
    non-ASCII text and DEL, which ``json`` escapes, and numbers, whose
    spellings differ (``1e+16`` and ``1e16``).
    """
    try:
        raw = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        raw = b"\x80"  # not ASCII: take the fallback below
    if raw.isascii() and b"\x7f" not in raw and not _has_number(obj):
        return raw.decode("ascii")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _has_number(obj: Any) -> bool:
    if isinstance(obj, dict):
        return any(_has_number(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_number(v) for v in obj)
    return not isinstance(obj, str)
