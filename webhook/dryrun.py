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

``index`` of an error is null for a file that could not be read at all.

With ``--probe`` (issue 8) fields are added, never changed: each rewrite gets
``probes``, and each object gets ``decisions``, one per container looked at::

    "decisions": [{"container": C, "path": JSON-POINTER, "image": IMAGE,
                   "action": "keep"|"rewrite"|"warn", "to": IMAGE|null,
                   "reason": CODE, "rule": RULE, "detail": TEXT,
                   "probes": [{"candidate": IMAGE, "outcome": OUTCOME,
                               "latencyMs": MS, "cached": BOOL}]}]
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
from webhook.core.aliases import excessive_aliasing
from webhook.core.ecr import DATA_VERSION
from webhook.core.errors import ConfigError, InputError, ReviewError
from webhook.core.objects import pod_sites
from webhook.core.patch import ANNOTATION_OMITTED, PatchOp, build_patch_checked
from webhook.core.plan import PlanContext, PodPlan, plan_pod
from webhook.core.review import Outcome, admit

REPORT_SCHEMA_VERSION = "v1"
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_DOC_SEP = re.compile(r"^---[ \t]*(?:#.*)?$|^---[ \t]+", re.MULTILINE)
_SUFFIXES = (".yaml", ".yml", ".json")
# The most read from one input (a file, device, pipe or stdin).  Inputs that
# are not regular files have no size to check first: ``-f /dev/zero`` or an
# endless pipe would otherwise be read until memory runs out.  64 MiB is 13
# times the 10,000-pod stream of bench/dryrun.py (4.9 MiB), about 130,000 pods,
# and planning it already takes some 1.2 GB of memory (peak RSS grows about 19
# times the text: 375 MiB for that stream at 40,000 pods, 19.5 MiB); a larger
# manifest set can be split over several files, each with this limit.
MAX_INPUT_BYTES = 64 * 1024 * 1024


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
    notes: tuple[str, ...] = ()  # warnings about the patch itself (annotation omitted)

    def report(self, probing: bool = False) -> dict[str, Any]:
        out = self._report()
        if probing:
            for entry, d in zip(out["rewrites"], self.plan.rewrites, strict=True):
                entry["probes"] = [p.as_json() for p in d.probes]
            out["decisions"] = [
                {
                    "container": d.container,
                    "path": f"{self.spec_pointer}/{d.path}",
                    "image": d.image,
                    "action": str(d.action),
                    "to": d.target,
                    "reason": str(d.reason),
                    "rule": d.rule,
                    "detail": d.detail,
                    "probes": [p.as_json() for p in d.probes],
                }
                for d in self.plan.decisions
            ]
        return out

    def _report(self) -> dict[str, Any]:
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
            + ([f"skipped: {self.plan.skipped}"] if self.plan.skipped else [])
            + list(self.notes),
        }


@dataclass
class Document:
    """One document of an input; ``index`` None for a file that could not be read."""

    source: str
    index: int | None
    data: Any = None
    error: str | None = None


@dataclass
class RunResult:
    documents: list[Document] = field(default_factory=list)
    objects: list[ObjectResult] = field(default_factory=list)
    # index into documents -> the rewritten document, for --output yaml
    rewritten: dict[int, Any] = field(default_factory=dict)
    probing: bool = False


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
        elif path.exists():
            # A regular file, or what a shell passes for one: a pipe from
            # ``-f <(cmd)`` (/dev/fd/N), /dev/stdin, /dev/null.
            yield p, p
        else:
            raise InputError(f"{p}: no such file or directory; pass a manifest file, a dir or -")


def read_input(path: str | None, stdin: IO[str] | None = None) -> str:
    """The text of one input (``path``, or stdin for None), at most ``MAX_INPUT_BYTES``.

    Reads one byte past the limit and no further: a larger input raises
    InputError without the rest being read.  Raises OSError, and
    UnicodeDecodeError for bytes that are not UTF-8.  Line ends are
    translated as text-mode reading does (universal newlines: ``\r\n`` and
    ``\r`` become ``\n``).
    """
    limit = MAX_INPUT_BYTES
    data: bytes | str
    if path is not None:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    else:
        stream = stdin or sys.stdin
        binary = getattr(stream, "buffer", None)
        # An in-memory text stream (io.StringIO) has no bytes: counted in characters.
        data = stream.read(limit + 1) if binary is None else binary.read(limit + 1)
    if len(data) > limit:
        raise InputError(
            f"not read: more than {limit // 2**20} MiB, the limit of one dry-run input; "
            "split it into several files"
        )
    text = data if isinstance(data, str) else data.decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def split_documents(text: str) -> list[str]:
    """Split a YAML stream into documents at ``---`` lines, keeping empty ones out.

    JSON text is split the same way: no JSON value has a line starting with
    ``---`` (a string cannot hold a raw newline), so a stream whose first
    document is a flow mapping or JSON object splits like any other.
    """
    parts = _DOC_SEP.split(text)
    return [p for p in parts if p.strip() and not _only_comments(p)]


def _only_comments(part: str) -> bool:
    return all(not ln.strip() or ln.lstrip().startswith("#") for ln in part.splitlines())


def _looks_like_json(text: str) -> bool:
    return text.lstrip().startswith(("{", "["))


def _document(name: str, index: int, data: Any) -> Document:
    """A loaded document, or its error when it is not a mapping."""
    if data is not None and not isinstance(data, Mapping):
        return Document(name, index, error="not a Kubernetes object (expected a mapping)")
    return Document(name, index, data)


def _guard_aliases(text: str, docs: list[Document]) -> list[Document]:
    """Refuse alias bombs (``webhook.core.aliases``).

    Only YAML text with both an anchor and an alias mark can hold aliases, so
    the common case costs two substring searches, not a walk of every document.
    """
    if "&" not in text or "*" not in text:
        return docs
    for d in docs:
        why = excessive_aliasing(d.data) if d.error is None else None
        if why is not None:
            d.data, d.error = None, why
    return docs


def read_documents(name: str, text: str) -> list[Document]:
    """Parse every document of ``text``; a bad one becomes a Document with ``error``.

    * JSON (a ``.json`` name, or text starting with ``{`` or ``[``) is read as a
      stream of JSON values, so concatenated objects (``jq -c``, several
      ``kubectl get -o json``) are documents 0, 1, ...
    * YAML, and JSON-looking text that is not a JSON stream (a flow mapping
      first, then ``---`` and block YAML): one ``load_all`` over the whole
      stream (the C loader's best case); only when that fails is the stream
      split at ``---`` lines and each document parsed on its own, so the error
      names its document and the others survive.
    * A ``.json`` file that is neither JSON nor YAML reports its JSON error,
      after the documents decoded before it.
    """
    json_name = name.endswith(".json")
    json_docs: list[Document] = []
    json_error: str | None = None
    if json_name or _looks_like_json(text):
        json_docs, json_error = _read_json_stream(name, text)
        if json_error is None:
            return json_docs
    try:
        loaded = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except (yaml.YAMLError, RecursionError):
        pass
    else:
        if all(isinstance(d, Mapping) for d in loaded):
            return _guard_aliases(text, [Document(name, i, d) for i, d in enumerate(loaded)])
    if json_name:
        return [*json_docs, Document(name, len(json_docs), error=f"not valid JSON: {json_error}")]
    return _guard_aliases(text, _read_one_by_one(name, text))


_SPACE = re.compile(r"\s*")


def _skip_space(text: str, pos: int) -> int:
    m = _SPACE.match(text, pos)
    return m.end() if m is not None else pos


def _read_json_stream(name: str, text: str) -> tuple[list[Document], str | None]:
    """Concatenated JSON values: (the documents, None) or (those before the error, error)."""
    decoder = json.JSONDecoder()
    docs: list[Document] = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        try:
            data, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            return docs, f"{exc.msg} (line {exc.lineno} column {exc.colno})"
        except RecursionError:
            return docs, "nested too deeply"
        docs.append(_document(name, len(docs), data))
        pos = _skip_space(text, pos)
    return docs, None


def _read_one_by_one(name: str, text: str) -> list[Document]:
    docs: list[Document] = []
    for i, part in enumerate(split_documents(text)):
        try:
            if part.lstrip().startswith("{"):
                try:
                    data = json.loads(part)
                except (ValueError, RecursionError):
                    data = yaml.load(part, Loader=_LOADER)  # nosec B506  # _LOADER is a safe loader
            else:
                data = yaml.load(part, Loader=_LOADER)  # nosec B506  # _LOADER is a safe loader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1} of the document)" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            docs.append(Document(name, i, error=f"not valid YAML: {problem}{where}"))
            continue
        except RecursionError:
            docs.append(Document(name, i, error="not valid YAML: nested too deeply"))
            continue
        docs.append(_document(name, i, data))
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
                notes: tuple[str, ...] = tuple(
                    w for w in reviewed.warnings if w == ANNOTATION_OMITTED
                )
            else:
                plan = plan_pod(site.meta, site.spec, site.namespace, ctx)
                patch, note = build_patch_checked(obj, plan, site.spec_pointer, site.meta_pointer)
                notes = (note,) if note else ()
            result.objects.append(
                ObjectResult(
                    doc.source,
                    doc.index or 0,  # a read document always has an index
                    obj,
                    site.kind,
                    site.namespace,
                    site.name,
                    site.spec_pointer,
                    plan,
                    patch,
                    notes,
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
    """The node of ``root`` at the place ``obj`` has in ``original`` (same shape).

    Each node of ``original`` is visited once, by identity: a document whose
    YAML aliases share a subtree is a graph, and walking it as a tree costs the
    alias expansion (issue 11's alias bomb).  Iterative, for deep documents.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, Any]] = [(root, original)]
    while stack:
        here, orig = stack.pop()
        if orig is obj:
            return here
        if id(orig) in seen:
            continue
        seen.add(id(orig))
        if isinstance(orig, Mapping):
            items: list[tuple[Any, Any]] = list(orig.items())
        elif isinstance(orig, list):
            items = list(enumerate(orig))
        else:
            continue
        for k, v in reversed(items):  # depth first, in document order
            if isinstance(v, Mapping | list):
                stack.append((here[k], v))
    return None


def _dump(data: Any) -> str:
    return str(yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False))


def render(result: RunResult, output: str, region: str | None, out: IO[str]) -> None:
    if output == "json":
        report = {
            "schemaVersion": REPORT_SCHEMA_VERSION,
            "region": region,
            "objects": [o.report(result.probing) for o in result.objects],
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
    by_doc: dict[tuple[str, int | None], list[ObjectResult]] = {}
    for o in result.objects:
        by_doc.setdefault((o.source, o.index), []).append(o)
    for n, doc in enumerate(result.documents):
        objs = by_doc.get((doc.source, doc.index), [])
        for o in objs:
            for message in [d.message for d in o.plan.warnings] + list(o.notes):
                out.write(f"# warning: {doc.source}[{doc.index}] {o.kind} {o.name}: {message}\n")
            if result.probing:
                for d in o.plan.decisions:
                    for p in d.probes:
                        out.write(f"# probe: {d.container}: {p.candidate} {p.outcome} "
                                  f"{p.latency_ms:.0f} ms{' (cached)' if p.cached else ''}\n")
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
    probe: Any = None,
) -> int:
    """The dry-run command.  Returns the exit code: 0, or 2 if any input was unreadable.

    ``probe`` (a ``webhook.prober.ProbeOptions``) turns availability probing on.
    """
    inputs = list(_expand(files))  # bad paths fail before anything else is said
    pol = load_policy_file(policy_file)
    if probe is not None:
        pol = probe.apply(pol)
        if probe.enabled or probe.endpoints or probe.ca_file or probe.timeout is not None:
            probe.check()  # bad flags fail before anything is read
    region = policy_mod.resolve_region(region_flag, pol, env)
    if region is None:
        err.write("warning: no cluster region (--region, policy region, AWS_REGION); "
                  "partition checks are off and wrong accounts are fixed in place\n")  # fmt: skip
    elif policy_mod.unknown_region(region):
        err.write(f"warning: region {region} is not in the registry data (version "
                  f"{DATA_VERSION}): its EKS account is unknown, so images in it are not "
                  "judged; images in other regions still are\n")  # fmt: skip
    ctx = PlanContext.build(pol, region)
    docs: list[Document] = []
    failed = False
    for name, path in inputs:
        try:
            text = read_input(path, stdin)
        except InputError as exc:
            docs.append(Document(name, None, error=str(exc)))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            # A file-level error: in the report's errors too, with index null.
            docs.append(Document(name, None, error=f"cannot read: {why}"))
            continue
        docs.extend(read_documents(name, text))
    # Only --probe makes dry-run ask registries (a policy's probe: key is for the server).
    probing = probe is not None and probe.enabled
    if probing:
        from webhook import prober

        ctx = prober.probe_documents(docs, ctx, probe)
    result = plan_documents(docs, ctx, rewrite=output in ("yaml", "diff"))
    result.probing = probing
    for d in docs:
        if d.error is not None:
            where = "" if d.index is None else f" document {d.index}:"
            err.write(f"error: {d.source}:{where} {d.error}\n")
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
