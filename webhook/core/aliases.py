"""YAML alias bombs: how big a loaded document is once its aliases are expanded.  Pure.

A YAML alias (``*a``) makes the loader reuse the anchored node (``&a``), so a
few hundred bytes can describe a tree of millions of nodes ("billion laughs"):
``b: &b [*a, *a, ...]``, ``c: &c [*b, *b, ...]``.  PyYAML builds the shared
objects once, so loading is cheap; any code that walks the tree as a tree then
pays for the expansion (issue 11: ``dry-run -o diff`` took 10 s on 528 bytes).

kubectl refuses such documents: sigs.k8s.io/yaml decodes with go-yaml, whose
decoder fails with "document contains excessive aliasing" when more than 100
aliases were followed, more than 1000 nodes decoded, and the share of nodes
decoded through aliases exceeds ``allowed_alias_ratio`` (go-yaml v2 decode.go,
the fix for CVE-2019-11253).  ``excessive_aliasing`` applies the same rule to a
loaded document, counting with memoisation so the count itself costs time
linear in the distinct nodes, never in the expansion.
"""

from __future__ import annotations

from collections.abc import Mapping

# go-yaml v2 decode.go: alias_ratio_range_low / _high.
RATIO_RANGE_LOW = 400_000
RATIO_RANGE_HIGH = 4_000_000


def allowed_alias_ratio(decoded: int) -> float:
    """go-yaml's allowedAliasRatio: 99 % for small documents, down to 10 % for huge ones."""
    if decoded <= RATIO_RANGE_LOW:
        return 0.99
    if decoded >= RATIO_RANGE_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decoded - RATIO_RANGE_LOW) / (RATIO_RANGE_HIGH - RATIO_RANGE_LOW)


def expansion(document: object) -> tuple[int, int]:
    """(nodes of the expanded tree, nodes as loaded): mappings, sequences and scalars.

    A mapping or sequence met again by identity (an alias) counts its expanded
    size again in the first figure and nothing in the second.  Iterative, so a
    deeply nested document cannot exhaust the stack.
    """
    sizes: dict[int, int] = {}
    distinct = 0
    # (node, children pushed?) — post-order over the DAG.
    stack: list[tuple[object, bool]] = [(document, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            children = _children(node)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            continue
        if key in sizes or not isinstance(node, Mapping | list):
            if not isinstance(node, Mapping | list):
                distinct += 1
            continue
        sizes[key] = 0  # placeholder: a cycle (never produced by a YAML loader) counts 0
        distinct += 1
        stack.append((node, True))
        for child in _children(node):
            if isinstance(child, Mapping | list) and id(child) not in sizes:
                stack.append((child, False))
            elif not isinstance(child, Mapping | list):
                distinct += 1
    if not isinstance(document, Mapping | list):
        return 1, 1
    return sizes[id(document)], distinct


def _children(node: object) -> list[object]:
    if isinstance(node, Mapping):
        return [*node.keys(), *node.values()]
    if isinstance(node, list):
        return node
    return []


def excessive_aliasing(document: object) -> str | None:
    """Why ``document`` is refused as an alias bomb (go-yaml's rule), or None."""
    expanded, distinct = expansion(document)
    through_aliases = expanded - distinct
    if (
        through_aliases > 100
        and expanded > 1000
        and through_aliases / expanded > allowed_alias_ratio(expanded)
    ):
        return (
            f"document contains excessive aliasing: {distinct} nodes expand to {expanded} "
            "through YAML aliases (kubectl refuses it too)"
        )
    return None
