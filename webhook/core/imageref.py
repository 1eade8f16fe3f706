"""Container image references, after the distribution/reference grammar.

The grammar is the one the kubelet and containerd use (github.com/distribution/
reference, ``reference.go`` and ``regexp.go``)::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain '/'] remote-name
    domain           := host [':' port-number]
    host             := domain-name | IPv4address | \\[ IPv6address \\]
    domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    path-component   := alpha-numeric [separator alpha-numeric]*
    alpha-numeric    := /[a-z0-9]+/
    separator        := /[_.]|__|[-]+/
    tag              := /[\\w][\\w.-]{0,127}/
    digest           := algorithm ":" hex     (hex at least 32 characters)

Contract: ``str(parse(s)) == s`` for every accepted ``s``.  The ``docker.io`` and
``library/`` defaults are applied only by the ``normalized_*`` properties, which
exist for *matching*; a rewrite never adds them to what the user wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from webhook.core.errors import InvalidReferenceError

# distribution/reference: NameTotalLengthMax = 255 (the whole name, domain included).
NAME_TOTAL_LENGTH_MAX = 255
# Tags are at most 128 characters: [\w][\w.-]{0,127}.
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?", re.ASCII
)
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
# go-digest validates the hex length of the algorithms it knows and rejects the rest
# (digest.Validate -> ErrDigestUnsupported).  The kubelet therefore refuses them too.
_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed image reference; immutable.

    ``domain`` is ``None`` when the reference names none (``nginx:1.27``).
    ``path`` is the repository path exactly as written (``eks/pause``).
    """

    domain: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.domain}/{self.path}" if self.domain is not None else self.path
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    @property
    def name(self) -> str:
        """Domain and path, without tag or digest, as written."""
        return f"{self.domain}/{self.path}" if self.domain is not None else self.path

    @property
    def host(self) -> str | None:
        """The domain without its port, lower-cased (DNS names are case-insensitive)."""
        if self.domain is None:
            return None
        if self.domain.startswith("["):
            return self.domain[: self.domain.index("]") + 1].lower()
        return self.domain.split(":", 1)[0].lower()

    @property
    def normalized_domain(self) -> str:
        """``docker.io`` when no domain was written; for matching only."""
        if self.domain is None or self.domain == LEGACY_DEFAULT_DOMAIN:
            return DEFAULT_DOMAIN
        return self.domain.lower()

    @property
    def normalized_path(self) -> str:
        """``library/x`` for a one-component Docker Hub path; for matching only."""
        if self.normalized_domain == DEFAULT_DOMAIN and "/" not in self.path:
            return OFFICIAL_REPO_PREFIX + self.path
        return self.path

    def with_name(self, domain: str, path: str) -> ImageRef:
        """The same tag and digest under another registry and repository path.

        Raises InvalidReferenceError when the result would not be a valid reference
        (for example a mirror prefix that makes the name longer than 255).
        """
        candidate = replace(self, domain=domain, path=path)
        return parse(str(candidate))


def _split_domain(name: str) -> tuple[str | None, str]:
    # distribution/reference splitDockerDomain: the first component is a domain
    # when it contains '.' or ':', is "localhost", or has an upper-case letter.
    i = name.find("/")
    if i == -1:
        return None, name
    first = name[:i]
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        return first, name[i + 1 :]
    return None, name


def parse(reference: str) -> ImageRef:
    """Parse ``reference``; raise InvalidReferenceError naming the fault."""
    if not isinstance(reference, str):
        raise InvalidReferenceError(repr(reference), "an image must be a string")
    if not reference:
        raise InvalidReferenceError(reference, "empty reference")
    if reference != reference.strip():
        raise InvalidReferenceError(reference, "leading or trailing whitespace")

    rest = reference
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidReferenceError(reference, f"invalid digest {digest!r}")
        algorithm, hexpart = digest.split(":", 1)
        want = _DIGEST_HEX_LEN.get(algorithm)
        if want is None:
            raise InvalidReferenceError(reference, f"unsupported digest algorithm {algorithm!r}")
        if len(hexpart) != want:
            raise InvalidReferenceError(
                reference, f"{algorithm} digest must have {want} hex characters"
            )

    tag: str | None = None
    # A tag is the text after the last ':' unless that ':' belongs to the domain's
    # port (then a '/' follows it).
    colon = rest.rfind(":")
    if colon != -1 and "/" not in rest[colon + 1 :]:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(reference, f"invalid tag {tag!r}")

    if not rest:
        raise InvalidReferenceError(reference, "no repository name")
    if len(rest) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReferenceError(
            reference, f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    domain, path = _split_domain(rest)
    if domain is not None and not _DOMAIN.fullmatch(domain):
        raise InvalidReferenceError(reference, f"invalid registry domain {domain!r}")
    if not _PATH.fullmatch(path):
        if path.lower() != path and _PATH.fullmatch(path.lower()):
            raise InvalidReferenceError(reference, "repository name must be lowercase")
        raise InvalidReferenceError(reference, f"invalid repository path {path!r}")
    return ImageRef(domain=domain, path=path, tag=tag, digest=digest)


def try_parse(reference: object) -> ImageRef | None:
    """``parse`` that answers None instead of raising."""
    if not isinstance(reference, str):
        return None
    try:
        return parse(reference)
    except InvalidReferenceError:
        return None
