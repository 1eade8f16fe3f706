"""``ecr-webhook dry-run``: the planner over manifest files, offline.

Input is any mix of files, directories (``*.yaml``, ``*.yml``, ``*.json``, sorted)
and ``-`` for stdin; each may hold several YAML documents or one JSON document.
Every document is parsed on its own, so one unreadable document is reported
(file and index, one line on stderr, non-zero exit) and the rest still are.

The JSON report (``--output json``) is a contract; its shape::

    {"schemaVersion": "v1", "region": R,
     "objects": [{"source": FILE, "index": I, "kind": K, "namespace": NS, "name": N,
                  "rewrites": [{"container": C, "path": JSON-POINTER, "from": IMAGE,
                                "to": IMAGE, "reason": CODE}],
                  "warnings": [...]}],
     "errors": [{"source": FILE, "index": I, "error": MESSAGE}]}
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonpatch
import yaml

from webhook.core import policy as policy_mod
from webhook.core.errors import ConfigError, InputError, ReviewError
from webhook.core.objects import pod_sites
from webhook.core.patch import PatchOp, build_patch
from webhook.core.plan import PlanContext, PodPlan, plan_pod
from webhook.core.review import Outcome, admit

REPORT_SCHEMA_VERSION = "v1"
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_DOC_SEP = re.compile(r"^---[ \t]*(?:#.*)?$|^---[ \t]+", re.MULTILINE)
_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ObjectResult:
    source: str
    index: int
    obj: Mapping[str, Any]
    kind: str
    namespace: str | None
    name: str | None
    spec_pointer: str
    plan: PodPlan
    patch: list[PatchOp]

    def report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "rewrites": [
                {
                    "container": d.container,
                    "path": f"{self.spec_pointer}/{d.path}",
                    "from": d.image,
                    "to": d.target,
                    "reason": str(d.reason),
                }
                for d in self.plan.rewrites
            ],
            "warnings": [d.message for d in self.plan.warnings]
            + ([f"skipped: {self.plan.skipped}"] if self.plan.skipped else []),
        }


@dataclass
class Document:
    source: str
    index: int
    data: Any = None
    error: str | None = None


@dataclass
class RunResult:
    documents: list[Document] = field(default_factory=list)
    objects: list[ObjectResult] = field(default_factory=list)
    # index into documents -> the rewritten document, for --output yaml
    rewritten: dict[int, Any] = field(default_factory=dict)


def _expand(paths: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(display name, path or None for stdin)."""
    for p in paths:
        if p == "-":
            yield "-", None
            continue
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
            if not found:
                raise InputError(f"{p}: no .yaml, .yml or .json files in this directory")
            for f in found:
                yield str(f), str(f)
        elif path.is_file():
            yield p, p
        else:
            raise InputError(f"{p}: no such file or directory; pass a manifest file, a dir or -")


def split_documents(text: str) -> list[str]:
    """Split a YAML stream into documents at ``---`` lines, keeping empty ones out."""
    if text.lstrip().startswith(("{", "[")):
        return [text]
    parts = _DOC_SEP.split(text)
    return [p for p in parts if p.strip() and not _only_comments(p)]


def _only_comments(part: str) -> bool:
    return all(not ln.strip() or ln.lstrip().startswith("#") for ln in part.splitlines())


def read_documents(name: str, text: str) -> list[Document]:
    """Parse every document of ``text``; a bad one becomes a Document with ``error``.

    Fast path: one ``load_all`` over the whole stream (the C loader's best case).
    Only when that fails is the stream split at ``---`` lines and each document
    parsed on its own, so the error names its document and the others survive.
    """
    if not name.endswith(".json") and not text.lstrip().startswith(("{", "[")):
        try:
            loaded = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
        except yaml.YAMLError:
            pass
        else:
            if all(isinstance(d, Mapping) for d in loaded):
                return [Document(name, i, d) for i, d in enumerate(loaded)]
    return _read_one_by_one(name, text)


def _read_one_by_one(name: str, text: str) -> list[Document]:
    docs: list[Document] = []
    for i, part in enumerate(split_documents(text)):
        try:
            if name.endswith(".json") or part.lstrip().startswith("{"):
                try:
                    data = json.loads(part)
                except ValueError:
                    data = yaml.load(part, Loader=_LOADER)  # nosec B506  # _LOADER is a safe loader
            else:
                data = yaml.load(part, Loader=_LOADER)  # nosec B506  # _LOADER is a safe loader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1} of the document)" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            docs.append(Document(name, i, error=f"not valid YAML: {problem}{where}"))
            continue
        if data is not None and not isinstance(data, Mapping):
            docs.append(Document(name, i, error="not a Kubernetes object (expected a mapping)"))
            continue
        docs.append(Document(name, i, data))
    return docs


def plan_documents(docs: list[Document], ctx: PlanContext, rewrite: bool = True) -> RunResult:
    """Plan every pod spec in ``docs``; pure apart from what ``ctx.oracle`` does.

    ``rewrite`` also applies each patch to a copy of its document (needed by the
    yaml and diff outputs only).
    """
    result = RunResult(documents=docs)
    for n, doc in enumerate(docs):
        if doc.error is not None or doc.data is None:
            continue
        patched_doc: Any = None
        reviewed = _admit(doc, ctx)
        if doc.error is not None:
            continue
        for obj, site in pod_sites(doc.data):
            if site is None:
                continue
            if reviewed is not None:
                # An AdmissionReview is answered exactly as the server answers it.
                plan, patch = reviewed.plan, list(reviewed.patch)
                if reviewed.skipped and not plan.skipped:
                    plan = PodPlan(skipped=reviewed.skipped)
            else:
                plan = plan_pod(site.meta, site.spec, site.namespace, ctx)
                patch = build_patch(obj, plan, site.spec_pointer, site.meta_pointer)
            result.objects.append(
                ObjectResult(
                    doc.source,
                    doc.index,
                    obj,
                    site.kind,
                    site.namespace,
                    site.name,
                    site.spec_pointer,
                    plan,
                    patch,
                )
            )
            if patch and rewrite:
                if patched_doc is None:
                    patched_doc = copy.deepcopy(doc.data)
                _apply_in_place(patched_doc, obj, doc.data, patch)
        if patched_doc is not None:
            result.rewritten[n] = patched_doc
    return result


def _admit(doc: Document, ctx: PlanContext) -> Outcome | None:
    """The server's answer to an AdmissionReview document (None for other kinds).

    A review the server would reject with 400 becomes the document's error.
    """
    if doc.data.get("kind") != "AdmissionReview":
        return None
    try:
        return admit(doc.data, ctx)
    except ReviewError as exc:
        doc.error = f"not a valid AdmissionReview: {exc}"
        return None


def _apply_in_place(
    root: Any, obj: Mapping[str, Any], original_root: Any, patch: list[PatchOp]
) -> None:
    """Apply ``patch`` (relative to ``obj``) to the matching object inside ``root``."""
    target = _locate(root, original_root, obj)
    patched = jsonpatch.JsonPatch(patch).apply(target)
    target.clear()
    target.update(patched)


def _locate(root: Any, original: Any, obj: Mapping[str, Any]) -> Any:
    if original is obj:
        return root
    if isinstance(original, Mapping):
        for k, v in original.items():
            found = _locate(root[k], v, obj) if isinstance(v, Mapping | list) else None
            if found is not None:
                return found
    elif isinstance(original, list):
        for i, v in enumerate(original):
            found = _locate(root[i], v, obj) if isinstance(v, Mapping | list) else None
            if found is not None:
                return found
    return None


def _dump(data: Any) -> str:
    return str(yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False))


def render(result: RunResult, output: str, region: str | None, out: IO[str]) -> None:
    if output == "json":
        report = {
            "schemaVersion": REPORT_SCHEMA_VERSION,
            "region": region,
            "objects": [o.report() for o in result.objects],
            "errors": [
                {"source": d.source, "index": d.index, "error": d.error}
                for d in result.documents
                if d.error is not None
            ],
        }
        # Compact: json's C encoder is used only without indent (pipe to jq to read).
        out.write(json.dumps(report, separators=(",", ":")))
        out.write("\n")
    elif output == "patch":
        for o in result.objects:
            if o.patch:
                line = {"source": o.source, "index": o.index, "kind": o.kind,
                        "namespace": o.namespace, "name": o.name, "patch": o.patch}  # fmt: skip
                out.write(json.dumps(line) + "\n")
    elif output == "yaml":
        first = True
        for n, doc in enumerate(result.documents):
            if doc.error is not None or doc.data is None:
                continue
            if not first:
                out.write("---\n")
            first = False
            out.write(_dump(result.rewritten.get(n, doc.data)))
    else:
        _render_diff(result, out)


def _render_diff(result: RunResult, out: IO[str]) -> None:
    changed = 0
    by_doc: dict[tuple[str, int], list[ObjectResult]] = {}
    for o in result.objects:
        by_doc.setdefault((o.source, o.index), []).append(o)
    for n, doc in enumerate(result.documents):
        objs = by_doc.get((doc.source, doc.index), [])
        for o in objs:
            for d in o.plan.warnings:
                out.write(f"# warning: {doc.source}[{doc.index}] {o.kind} {o.name}: {d.message}\n")
        if n not in result.rewritten:
            continue
        changed += 1
        label = f"{doc.source}[{doc.index}]"
        for o in objs:
            for d in o.plan.rewrites:
                out.write(f"# {label} {o.kind} {o.namespace or '-'}/{o.name}: "
                          f"{d.container}: {d.reason} ({d.detail})\n")  # fmt: skip
        before = _dump(doc.data).splitlines(keepends=True)
        after = _dump(result.rewritten[n]).splitlines(keepends=True)
        out.writelines(difflib.unified_diff(before, after, f"a/{label}", f"b/{label}", n=2))
    total = len(result.objects)
    rewrites = sum(len(o.plan.rewrites) for o in result.objects)
    out.write(f"# {total} pod specs, {changed} documents changed, {rewrites} images rewritten\n")


def run(
    files: Sequence[str],
    region_flag: str | None,
    policy_file: str | None,
    output: str,
    env: Mapping[str, str],
    out: IO[str],
    err: IO[str],
    stdin: IO[str] | None = None,
) -> int:
    """The dry-run command.  Returns the exit code: 0, or 2 if any input was unreadable."""
    inputs = list(_expand(files))  # bad paths fail before anything else is said
    pol = load_policy_file(policy_file)
    region = policy_mod.resolve_region(region_flag, pol, env)
    if region is None:
        err.write("warning: no cluster region (--region, policy region, AWS_REGION); "
                  "partition checks are off and wrong accounts are fixed in place\n")  # fmt: skip
    ctx = PlanContext.build(pol, region)
    docs: list[Document] = []
    failed = False
    for name, path in inputs:
        try:
            if path is None:
                text = (stdin or sys.stdin).read()
            else:
                text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            err.write(f"error: {name}: cannot read: {getattr(exc, 'strerror', None) or exc}\n")
            failed = True
            continue
        docs.extend(read_documents(name, text))
    result = plan_documents(docs, ctx, rewrite=output in ("yaml", "diff"))
    for d in docs:
        if d.error is not None:
            err.write(f"error: {d.source}: document {d.index}: {d.error}\n")
            failed = True
    render(result, output, region, out)
    return 2 if failed else 0


def load_policy_file(path: str | None) -> policy_mod.Policy:
    if path is None:
        return policy_mod.Policy()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--policy {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--policy {path}: not UTF-8 text; a policy is YAML") from None
    return policy_mod.load_policy(text, source=path)


__all__ = ["plan_documents", "read_documents", "render", "run"]
