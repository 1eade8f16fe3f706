"""webhook.core.jsonc: orjson where it can, the same answers as ``json`` where it cannot."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.core import jsonc

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_round_trips_like_the_standard_library(value: object) -> None:
    encoded = jsonc.dumps(value)
    assert json.loads(encoded) == value
    assert jsonc.loads(encoded) == value


@pytest.mark.parametrize(
    "raw",
    [b'{"s": "\\ud800"}', b'{"f": NaN}'],
    ids=["lone-surrogate", "nan"],
)
def test_what_orjson_refuses_is_read_as_json_reads_it(raw: bytes) -> None:
    got, want = jsonc.loads(raw), json.loads(raw)
    assert repr(got) == repr(want)
    assert json.loads(jsonc.dumps(got).decode("utf-8", "surrogatepass")) is not None


def test_integers_beyond_64_bits_are_read_as_floats() -> None:
    """orjson's one silent difference.  Harmless here: the webhook reads no number
    from a review (only strings and ``dryRun``), and never echoes the object."""
    assert jsonc.loads(b'{"n": 123456789012345678901234567890}') == {"n": 1.2345678901234568e29}
    assert json.loads(jsonc.dumps({"n": 2**70})) == {"n": 2**70}  # encoding falls back exactly


def test_invalid_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsonc.loads(b"{nope")


def test_non_string_keys_and_odd_objects_still_encode() -> None:
    assert json.loads(jsonc.dumps({1: "a", "b": {2, 3} and "x"})) == {"1": "a", "b": "x"}
    assert jsonc.dumps({"e": ValueError("boom")}) == b'{"e":"boom"}'


# Text as annotations carry it: ASCII, controls, DEL, non-ASCII, surrogates.
texts = st.text(st.characters(codec=None, blacklist_categories=()), max_size=12) | st.sampled_from([
    "\x7f", "a\x00b", "é", "\u2028",
    "602401143452.dkr.ecr.af-south-1.amazonaws.com/eks/pause:3.10",
])  # fmt: skip


@given(st.recursive(
    texts | st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_dumps_sorted_is_byte_for_byte_the_standard_librarys(value: object) -> None:
    """The originals annotation's text must not depend on the library that wrote it."""
    assert jsonc.dumps_sorted(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
