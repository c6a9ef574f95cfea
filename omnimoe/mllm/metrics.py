"""Scores for the Uni-MoE task files (:mod:`omnimoe.mllm.tasks`): token F1 for open answers, accuracy for
closed ones, and a summary with the spread across tasks (Uni-MoE's "performance bias across modalities").
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Iterable, Sequence

from omnimoe.mllm.tasks import TASKS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)
_APOSTROPHES = {"'", "\u2018", "\u2019", "`"}
_HEDGES = {"or", "and"}  # "yes or no", "animals and food": naming two choices is no answer


def normalise_answer(s: str) -> str:
    """SQuAD-style: lowercase, strip punctuation (ASCII's and any Unicode punctuation), drop the articles
    a/an/the, collapse whitespace. Apostrophes are deleted as in SQuAD ("The Koala's!" -> "koalas"); other
    punctuation becomes a space, so words joined by a dash or slash stay apart ("Mercury—the planet" ->
    "mercury planet", "yes/no" -> "yes no")."""
    s = "".join(
        "" if c in _APOSTROPHES else " " if c in _ASCII_PUNCT or unicodedata.category(c).startswith("P") else c
        for c in str(s).lower()
    )
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised answers (bag of tokens). Both empty: 1.0; one empty: 0.0."""
    pred, ref = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _find_all(tokens: list[str], needle: list[str]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(tokens) - n + 1) if tokens[i : i + n] == needle]


def resolve_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a free-form prediction names, or None when it names none or is ambiguous.

    On normalised tokens: a prediction that *is* a choice names it; one that *starts* with a choice names it
    ("Yes, it is." -> yes; the longest choice when several start it), unless a hedge ("yes or no") or another
    choice ("yes/no") follows it; otherwise it must mention exactly one choice anywhere ("I think it is
    food." -> food). Two choices mentioned ("it is not food, it is clothes") are ambiguous. Returns the
    choice as given.
    """
    pred = normalise_answer(prediction).split()
    norm = [(c, normalise_answer(c).split()) for c in choices]
    norm = [(c, n) for c, n in norm if n]
    if not pred or not norm:
        return None
    for c, n in norm:
        if n == pred:
            return c
    leading = [(c, n) for c, n in norm if pred[: len(n)] == n]
    if leading:
        c, n = max(leading, key=lambda cn: len(cn[1]))
        rest = pred[len(n) :]
        hedged = bool(rest) and (rest[0] in _HEDGES or any(rest[: len(m)] == m != n for _, m in norm))  # "yes/no"
        return None if hedged else c
    # mentions anywhere; an occurrence inside a longer choice's ("cream" in "ice cream") does not count
    spans = [(c, i, i + len(n)) for c, n in norm for i in _find_all(pred, n)]
    mentioned = {c for c, s, e in spans if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for _, s2, e2 in spans)}
    distinct = {tuple(normalise_answer(c).split()) for c in mentioned}
    return min(mentioned) if len(distinct) == 1 else None


def closed_correct(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """Whether the choice the prediction names (:func:`resolve_choice`) is the answer (compared normalised,
    so answer "Yes." matches choice "yes"). No choice named, or an ambiguous one: wrong."""
    chosen = resolve_choice(prediction, choices)
    return chosen is not None and normalise_answer(chosen) == normalise_answer(answer)


def task_kind(record: dict[str, Any]) -> str:
    """ "open" or "closed": from :data:`TASKS`, or for a task it does not list, closed when it has choices."""
    spec = TASKS.get(record.get("task", ""))
    if spec is not None:
        return spec["kind"]
    return "closed" if record.get("choices") else "open"  # a task this version does not know


def score(record: dict[str, Any], prediction: str) -> float:
    """1.0/0.0 for a closed task (the record's ``choices``), token F1 against ``answer`` for an open one."""
    if task_kind(record) == "closed":
        if not record.get("choices"):
            raise ValueError(f"record {record.get('id')!r}: closed task {record.get('task')!r} without choices")
        return float(closed_correct(prediction, record["answer"], record["choices"]))
    return token_f1(prediction, record["answer"])


def _spread(means: Sequence[float]) -> dict[str, float | None]:
    if not means:
        return {"max_min": None, "std": None}
    mu = sum(means) / len(means)
    return {"max_min": max(means) - min(means), "std": math.sqrt(sum((m - mu) ** 2 for m in means) / len(means))}


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rows ``{"task", "group", "score"}`` -> per task ``{mean, n, group}``; per group ``{mean, n, tasks}``
    (``mean`` is the macro mean over the group's tasks, so a task with many rows does not outweigh the
    others); ``overall`` the macro mean over tasks; ``spread`` the max-min and population std of the
    per-task means (``group_spread`` the same over groups): how uneven the model is across tasks/modalities.
    """
    per_task: dict[str, list[float]] = {}
    group_of: dict[str, str] = {}
    for row in rows:
        task, group, value = row["task"], row["group"], float(row["score"])
        if math.isnan(value):
            raise ValueError(f"task {task!r}: a NaN score")
        if group_of.setdefault(task, group) != group:
            raise ValueError(f"task {task!r} appears under groups {group_of[task]!r} and {group!r}")
        per_task.setdefault(task, []).append(value)
    tasks = {t: {"mean": sum(v) / len(v), "n": len(v), "group": group_of[t]} for t, v in sorted(per_task.items())}
    groups: dict[str, dict[str, Any]] = {}
    for t, d in tasks.items():
        g = groups.setdefault(d["group"], {"means": [], "n": 0, "tasks": []})
        g["means"].append(d["mean"])
        g["n"] += d["n"]
        g["tasks"].append(t)
    groups = {
        g: {"mean": sum(d["means"]) / len(d["means"]), "n": d["n"], "tasks": d["tasks"]}
        for g, d in sorted(groups.items())
    }
    means = [d["mean"] for d in tasks.values()]
    return {
        "tasks": tasks,
        "groups": groups,
        "overall": sum(means) / len(means) if means else None,
        "n": sum(d["n"] for d in tasks.values()),
        "spread": _spread(means),
        "group_spread": _spread([d["mean"] for d in groups.values()]),
    }
