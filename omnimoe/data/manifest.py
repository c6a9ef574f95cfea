"""The manifest: a JSON Lines file, one sample a line.

Required fields: ``id`` (unique string) and ``split`` (e.g. "train", "val", "test"). Content fields:
``text`` (a caption) and media paths, ``image``, ``audio`` (speech) and ``sound`` (non-speech audio), *relative
to the manifest's folder* (absolute paths are accepted but make a manifest unmovable). Any other field is
kept as is (``category``, ``lang``, ...).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from omnimoe.io import atomic_path

MEDIA_FIELDS = ("image", "audio", "sound")
CONTENT_FIELDS = ("text", *MEDIA_FIELDS)


class ManifestError(ValueError):
    """The manifest file itself is unusable (not found, a line not JSON, missing id...)."""


@dataclass
class Problem:
    line: int  # 1-based line in the manifest
    sample_id: str | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (id {self.sample_id!r})" if self.sample_id is not None else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"


@dataclass
class ValidationReport:
    samples: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"{self.samples} samples; splits {self.splits}; fields {self.fields}"]
        lines += [f"  {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more problems")
        return "\n".join(lines)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Parse every line (blank lines skipped); a malformed line is fatal and named."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ManifestError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("id"), str) or not rec["id"]:
                raise ManifestError(f"{path} line {n}: missing or non-string 'id'")
            rec["_line"] = n
            records.append(rec)
    return records


def write_manifest(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Atomically write records (fields starting with '_' are dropped)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    return path


def media_path(manifest: str | Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else Path(manifest).resolve().parent / p


def validate_manifest(
    path: str | Path, check_files: bool = True, decode: Callable[[str, Path], None] | None = None
) -> ValidationReport:
    """Check ids (unique), splits, field types, empty captions and (optionally) that media files exist.
    ``decode(field, path)``, when given, reads each existing media file and raises ``ValueError`` (any
    subclass) for one that cannot be decoded: the reason becomes that record's problem."""
    records = read_manifest(path)
    report = ValidationReport(samples=len(records))
    seen: dict[str, int] = {}
    splits: Counter[str] = Counter()
    fields: Counter[str] = Counter()
    for rec in records:
        n, sid = rec["_line"], rec["id"]
        if sid in seen:
            report.problems.append(Problem(n, sid, "id", f"duplicate id (first on line {seen[sid]})"))
        else:
            seen[sid] = n
        split = rec.get("split")
        if not isinstance(split, str) or not split:
            report.problems.append(Problem(n, sid, "split", "missing or not a string"))
        else:
            splits[split] += 1
        if not any(rec.get(f) is not None for f in CONTENT_FIELDS):
            report.problems.append(Problem(n, sid, None, f"no content field ({', '.join(CONTENT_FIELDS)})"))
        text = rec.get("text")
        if text is not None:
            if not isinstance(text, str):
                report.problems.append(Problem(n, sid, "text", f"not a string: {text!r}"))
            elif not text.strip():
                report.problems.append(Problem(n, sid, "text", "empty caption"))
        for f in CONTENT_FIELDS:
            if rec.get(f) is not None:
                fields[f] += 1
        for f in MEDIA_FIELDS:
            value = rec.get(f)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                report.problems.append(Problem(n, sid, f, f"expected a relative path string, got {value!r}"))
            elif check_files and not media_path(path, value).is_file():
                report.problems.append(Problem(n, sid, f, f"missing file {value}"))
            elif check_files and decode is not None:
                try:
                    decode(f, media_path(path, value))
                except ValueError as exc:
                    report.problems.append(Problem(n, sid, f, str(exc)))
    report.splits, report.fields = dict(splits), dict(fields)
    return report
