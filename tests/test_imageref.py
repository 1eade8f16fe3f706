"""The distribution/reference grammar: examples from upstream's reference_test.go,
plus property tests (round-trip, never a crash on arbitrary text)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.core.errors import InvalidReferenceError
from webhook.core.imageref import ImageRef, parse, try_parse

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "domain", "path", "tag", "digest"),
    [
        ("nginx", None, "nginx", None, None),
        ("nginx:1.27", None, "nginx", "1.27", None),
        ("library/nginx:1.27", None, "library/nginx", "1.27", None),
        ("localhost/foo", "localhost", "foo", None, None),
        ("localhost:5000/foo:bar", "localhost:5000", "foo", "bar", None),
        ("localhost:5000", None, "localhost", "5000", None),
        ("[::1]:5000/foo", "[::1]:5000", "foo", None, None),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", None),
        (f"foo/bar@{DIGEST}", None, "foo/bar", None, DIGEST),
        (f"foo/bar:v1@{DIGEST}", None, "foo/bar", "v1", DIGEST),
        (
            "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni:v1.23.1",
            "602401143452.dkr.ecr.us-west-2.amazonaws.com",
            "amazon-k8s-cni",
            "v1.23.1",
            None,
        ),
        ("a__b/c--d.e_f:tag-1.2_3", None, "a__b/c--d.e_f", "tag-1.2_3", None),
        ("Foo.example/bar", "Foo.example", "bar", None, None),
    ],
)
def test_parse_examples(
    ref: str, domain: str | None, path: str, tag: str | None, digest: str | None
) -> None:
    r = parse(ref)
    assert (r.domain, r.path, r.tag, r.digest) == (domain, path, tag, digest)
    assert str(r) == ref


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("", "empty"),
        ("Nginx", "lowercase"),
        ("example.com/Upper/path", "lowercase"),
        ("nginx:", "invalid tag"),
        ("nginx:-x", "invalid tag"),
        ("nginx:" + "a" * 129, "invalid tag"),
        ("foo@sha256:abc", "invalid digest"),
        ("foo@sha256:" + "a" * 63, "64 hex"),
        ("foo@md5:" + "a" * 32, "unsupported digest"),
        ("a/" * 130 + "b", "longer than 255"),
        (" nginx", "whitespace"),
        ("foo//bar", "invalid repository path"),
        ("-foo.example/bar", "invalid registry domain"),
        ("foo/bar_", "invalid repository path"),
    ],
)
def test_invalid(ref: str, why: str) -> None:
    with pytest.raises(InvalidReferenceError) as exc:
        parse(ref)
    assert why in str(exc.value)
    assert try_parse(ref) is None


def test_normalization_is_for_matching_only() -> None:
    r = parse("nginx:1.27")
    assert r.normalized_domain == "docker.io"
    assert r.normalized_path == "library/nginx"
    assert str(r) == "nginx:1.27"
    assert parse("index.docker.io/nginx").normalized_domain == "docker.io"
    assert parse("quay.io/nginx").normalized_path == "nginx"


def test_with_name_keeps_tag_and_digest() -> None:
    r = parse(f"old.example/eks/pause:3.10@{DIGEST}")
    assert str(r.with_name("new.example:5000", "mirror/eks/pause")) == (
        f"new.example:5000/mirror/eks/pause:3.10@{DIGEST}"
    )


def test_with_name_rejects_a_too_long_result() -> None:
    r = parse("a.example/" + "x" * 200)
    with pytest.raises(InvalidReferenceError):
        r.with_name("b.example", "p" * 60 + "/" + "x" * 200)


def test_host_strips_port_and_lowercases() -> None:
    assert parse("Foo.Example:5000/bar").host == "foo.example"
    assert parse("[::1]:5000/bar").host == "[::1]"
    assert parse("bar").host is None


# --- properties ----------------------------------------------------------------------

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_component = st.builds(
    lambda a, sep, b: a + sep + b if sep is not None else a,
    _alnum,
    st.sampled_from([None, ".", "_", "__", "-", "--"]),
    _alnum,
)
_path = st.lists(_component, min_size=1, max_size=4).map("/".join)
_domain = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "localhost",
            "localhost:5000",
            "quay.io",
            "[::1]:5000",
            "602401143452.dkr.ecr.us-west-2.amazonaws.com",
        ]
    ),
    st.lists(
        st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True),
        min_size=2,
        max_size=4,
    ).map(".".join),
)
_tag = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
_digest = st.one_of(
    st.none(), st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
)


@settings(max_examples=400)
@given(_domain, _path, _tag, _digest)
def test_round_trip(domain: str | None, path: str, tag: str | None, digest: str | None) -> None:
    ref = ImageRef(domain, path, tag, digest)
    text = str(ref)
    if domain is None and "/" in path and "." in path.split("/", maxsplit=1)[0]:
        return  # the first component would read as a domain; not the reference we built
    parsed = parse(text)
    assert str(parsed) == text
    assert (parsed.tag, parsed.digest) == (tag, digest)


@settings(max_examples=1000)
@given(st.text(max_size=300))
def test_never_crashes_on_arbitrary_text(text: str) -> None:
    try:
        r = parse(text)
    except InvalidReferenceError:
        return
    assert str(r) == text


@settings(max_examples=300)
@given(st.text(alphabet="abc019:/@._-ABC[]", max_size=60))
def test_never_crashes_on_reference_like_text(text: str) -> None:
    r = try_parse(text)
    assert r is None or str(r) == text
