"""Change a spec's model candidates from code, as a person would by hand.

An experiment (the notebook in notebooks/) reaches production only as a change to the spec:
the next training run reads the new candidates, its search includes them, and the promotion
gates judge the result against the champion. Nothing here registers a model or moves an
alias.

The edit rewrites the `model.candidates` list only, as text: the rest of the file (comments,
key order, quoting, line endings) is kept byte for byte, and so are the other candidates'
lines unless the list is in flow style (`[...]`, then rewritten whole), so the diff a
reviewer reads is the candidate alone. Every proposal is checked three ways before it is returned: the candidate against the
spec's task and its estimator's parameters, the new text with the spec model (load_spec's
rules), and the parsed result against the old one (only the candidates changed).
"""

from __future__ import annotations

import difflib
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlops.spec import (
    CandidateSpec,
    Spec,
    SpecError,
    _problems,
    _read,
    load_spec,
    spec_from_text,
)


class SpecEditError(ValueError):
    """A proposed candidate or spec edit that cannot be used; the message says which field and
    what to do."""


_TOP_KEY = re.compile(r"^[^\s#]")  # a line at column 0 that is not a comment: a top-level key
_MODEL_KEY = re.compile(r"^model\s*:\s*(#.*)?$")  # `model:` holding a block mapping
_ITEM = re.compile(r"\s*-(\s|$)")  # a block sequence item


def candidate_problems(spec: Spec, candidate: CandidateSpec) -> list[tuple[str, str]]:
    """(field, message) for each reason `candidate` would fail the spec's training run.

    The spec model checks each field on its own; a training run also needs an estimator of the
    spec's task, parameter names the estimator knows (scikit-learn refuses unknown ones when
    the run builds it, xgboost passes them on unchecked) and no parameter both fixed and
    searched (the search would silently override the fixed value)."""
    from mlops.modeling import make_estimator

    problems = [
        (f"search_space.{k}", f"'{k}' is also fixed in params; give it in one of the two")
        for k in sorted(set(candidate.params) & set(candidate.search_space))
    ]
    probe: dict[str, Any] = dict(candidate.params)
    for k, sp in candidate.search_space.items():
        probe[k] = sp.choices[0] if sp.choices else int(sp.low) if sp.type == "int" else sp.low
    try:
        make_estimator(spec.model.task, candidate.estimator, probe, spec.model.seed)
    except ValueError as e:  # an estimator of the other task
        problems.append(("estimator", f"{e} (the spec's model.task is {spec.model.task})"))
    except TypeError as e:  # a parameter the estimator does not take
        known = _parameter_names(spec, candidate.estimator)
        problems.append(
            (
                "params",
                f"{candidate.estimator} does not take these parameters ({e}); "
                f"it takes: {', '.join(known)}",
            )
        )
    return problems


def checked_candidate(spec: Spec, candidate: CandidateSpec | Mapping[str, Any]) -> CandidateSpec:
    """`candidate` (as written in a spec, or a CandidateSpec) once the spec model and
    candidate_problems accept it for `spec`; else SpecEditError naming every problem, so a
    notebook learns before training what the spec would refuse."""
    if isinstance(candidate, CandidateSpec):
        cand = candidate
    else:
        try:
            cand = CandidateSpec.model_validate(dict(candidate))
        except ValidationError as e:
            lines = "\n".join(f"  model.candidates[new].{loc}: {m}" for loc, m in _problems(e))
            raise SpecEditError(f"{spec.path}: the candidate is refused\n{lines}") from None
    problems = candidate_problems(spec, cand)
    if problems:
        lines = "\n".join(f"  model.candidates[{cand.estimator}].{f}: {m}" for f, m in problems)
        raise SpecEditError(f"{spec.path}: the candidate is refused\n{lines}")
    return cand


def _parameter_names(spec: Spec, estimator: str) -> list[str]:
    from mlops.modeling import make_estimator

    est = make_estimator(spec.model.task, estimator, {}, spec.model.seed)
    est = est.steps[-1][1] if hasattr(est, "steps") else est
    return sorted(est.get_params(deep=False))


def propose_candidate(path: str | Path, candidate: CandidateSpec | Mapping[str, Any]) -> str:
    """The spec file's text with `candidate` in `model.candidates`; the file is not written.

    A candidate of an estimator the spec already lists replaces that one (how a search space
    is narrowed): the search keys candidates by estimator, so a second one would shadow the
    first. Raises SpecEditError for a candidate the spec's training run could not use and
    SpecError when the file itself is not a valid spec."""
    path = Path(path)
    text = read_text(path)
    current = spec_from_text(text, path)
    cand = checked_candidate(current, candidate)
    old = list(current.model.candidates)
    at = next((i for i, c in enumerate(old) if c.estimator == cand.estimator), None)
    wanted = [*old[:at], cand, *old[at + 1 :]] if at is not None else [*old, cand]
    if wanted == old:
        return text
    for edit in (_edit_items, _edit_candidates_key):
        new_text = edit(text, wanted, at)
        if new_text is not None and _only_candidates_changed(path, current, new_text, wanted):
            return new_text
    raise SpecEditError(
        f"{path}: could not add the candidate without touching the rest of the file (is "
        "`model:` written in flow style, or are the candidates a YAML alias?); add it by hand:\n"
        + _render([cand], "  - ")
    )


def write_spec(path: str | Path, text: str, expected: str | None = None) -> Spec:
    """Replace the spec file with `text` atomically: a new file in the same folder, flushed,
    then renamed over the old one, so a Dagster process or a person reading the file sees
    the old spec or the new one, never half of it. The temporary file ends in `.tmp`, which
    the specs folder's `*.yaml` never matches.

    The text is validated first (nothing invalid is written). `expected`: the text the edit
    was proposed from; if the file has changed since, nothing is written (propose again)."""
    path = Path(path)
    spec_from_text(text, path)
    if expected is not None and read_text(path) != expected:
        raise SpecEditError(
            f"{path} changed since the edit was proposed; propose the candidate again"
        )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return load_spec(path)


def read_text(path: str | Path) -> str:
    """The spec file's text as it is on disk, line endings included (what `expected` of
    write_spec compares with), after load_spec's checks of size and encoding."""
    path = Path(path)
    _read(path)
    with path.open(encoding="utf-8", newline="") as f:
        return f.read()


def spec_diff(old: str, new: str, path: str | Path) -> str:
    """A unified diff of two texts of the spec file ("" if equal)."""
    name = Path(path).name
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}"
    )
    return "".join(
        line if line.endswith("\n") else f"{line}\n\\ No newline at end of file\n" for line in lines
    )


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the platform allows opening a folder (not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Text edits ---------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content(line: str) -> bool:
    """Not blank and not a comment."""
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _block_end(lines: list[str], start: int, stop: int, indent: int) -> int:
    """End (exclusive) of the entry whose key line is lines[start]: up to the next content line
    indented `indent` or less (but a sequence item `- ...` may sit at the key's own indent),
    less the blank lines and shallower comments just before it, which belong to what follows."""

    def ends(line: str) -> bool:
        n = _indent(line)
        return _content(line) and (n < indent or (n == indent and not _ITEM.match(line)))

    end = next((i for i in range(start + 1, stop) if ends(lines[i])), stop)
    while end > start + 1 and (
        not lines[end - 1].strip()
        or (not _content(lines[end - 1]) and _indent(lines[end - 1]) <= indent)
    ):
        end -= 1
    return end


def _candidates_entry(lines: list[str]) -> tuple[int, int, int] | None:
    """(first line, end, indent) of the `candidates:` entry of the top-level `model:` block."""
    model = next((i for i, line in enumerate(lines) if _MODEL_KEY.match(line)), None)
    if model is None:
        return None
    stop = next((i for i in range(model + 1, len(lines)) if _TOP_KEY.match(lines[i])), len(lines))
    keys = [i for i in range(model + 1, stop) if _content(lines[i])]
    if not keys:
        return None
    indent = _indent(lines[keys[0]])
    for i in keys:
        if _indent(lines[i]) == indent and re.match(r"\s*candidates\s*:", lines[i]):
            return i, _block_end(lines, i, stop, indent), indent
    return None


def _edit_items(text: str, wanted: list[CandidateSpec], at: int | None) -> str | None:
    """Replace candidate `at` (an item of the block sequence) or append the new one after the
    last, leaving every other item's text alone."""
    lines = text.splitlines(keepends=True)
    found = _candidates_entry(lines)
    if found is None:
        return None
    key, end, _ = found
    if _content(lines[key].split(":", 1)[1]):  # `candidates: [...]`: a flow sequence
        return None
    items = [i for i in range(key + 1, end) if _ITEM.match(lines[i])]
    if not items:
        return None
    dash = _indent(lines[items[0]])
    items = [i for i in items if _indent(lines[i]) == dash]
    if at is not None and at >= len(items):
        return None
    eol = "\r\n" if lines[key].endswith("\r\n") else "\n"
    if at is None:
        first = last = end  # append after the last item's last line
        new = wanted[-1]
    else:
        first = items[at]
        last = items[at + 1] if at + 1 < len(items) else end
        while last > first + 1 and not _content(lines[last - 1]):
            last -= 1  # comments and blank lines before the next item stay
        new = wanted[at]
    if first > 0 and not lines[first - 1].endswith(("\n", "\r")):
        lines[first - 1] += eol  # appending after a last line without a newline
    body = _render([new], " " * dash + "- ", eol)
    return "".join([*lines[:first], body, *lines[last:]])


def _edit_candidates_key(text: str, wanted: list[CandidateSpec], at: int | None) -> str | None:
    """Rewrite the whole `candidates:` entry (when its items cannot be edited one by one: a
    flow sequence): comments inside it are lost, the rest of the file is kept."""
    lines = text.splitlines(keepends=True)
    found = _candidates_entry(lines)
    if found is None:
        return None
    key, end, indent = found
    eol = "\r\n" if lines[key].endswith("\r\n") else "\n"
    pad = " " * indent
    body = f"{pad}candidates:{eol}" + _render(wanted, pad + "  - ", eol)
    return "".join([*lines[:key], body, *lines[end:]])


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()


def _render(candidates: list[CandidateSpec], dash: str, eol: str = "\n") -> str:
    """Candidates as block sequence items starting with `dash` ("    - "): the estimator, then
    params as one flow mapping, then one flow mapping per searched parameter."""
    pad = " " * len(dash)
    out = []
    for c in candidates:
        out.append(f"{dash}estimator: {c.estimator}{eol}")
        if c.params:
            out.append(f"{pad}params: {_flow(dict(c.params))}{eol}")
        if c.search_space:
            out.append(f"{pad}search_space:{eol}")
            for name, sp in c.search_space.items():
                d = sp.model_dump(exclude_none=True, exclude_defaults=True)
                d = {"type": sp.type, **{k: _whole(sp.type, v) for k, v in d.items()}}
                out.append(f"{pad}  {_flow({name: d})[1:-1]}{eol}")
    return "".join(out)


def _whole(kind: str, v: Any) -> Any:
    """int search bounds as 3, not 3.0 (the spec model stores them as floats)."""
    return int(v) if kind == "int" and isinstance(v, float) and v.is_integer() else v


def _only_candidates_changed(
    path: Path, old: Spec, new_text: str, wanted: list[CandidateSpec]
) -> bool:
    try:
        new = spec_from_text(new_text, path)
    except SpecError:
        return False
    rest = {"model": {"candidates"}}
    return new.model.candidates == wanted and new.model_dump(exclude=rest) == old.model_dump(
        exclude=rest
    )
