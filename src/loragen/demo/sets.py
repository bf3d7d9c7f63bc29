"""The demo world's text sets: JSONL package data under `loragen/demo/data` (its README says what
each set is for and how it was written).

Every line is one text, `{"task": ..., "text": ...}` (sets of one task's descriptions) or
`{"text": ...}` (sets that describe no task), in the order the set is used. The blind set's lines
also carry `batch`, the independently written part a text belongs to.

Registry sets (`descriptions`, `extra`, `styled`, `written`) feed the build; test sets (`unseen`,
`dev`, `blind`) feed the evaluation only. Both are read here, in `loragen.demo`, which training code
never imports.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

REGISTRY_SETS = ("extra", "styled", "written")  # registry descriptions beyond each task's own three
TEST_SETS = ("dev", "blind")  # paraphrases no registry holds, scored by `loragen eval demo`


@cache
def _rows(name: str) -> tuple[dict[str, Any], ...]:
    text = (resources.files(__package__) / "data" / f"{name}.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def by_task(name: str) -> dict[str, tuple[str, ...]]:
    """Set `name`'s texts per task, tasks in order of first appearance, texts in file order."""
    out: dict[str, list[str]] = {}
    for row in _rows(name):
        out.setdefault(row["task"], []).append(row["text"])
    return {task: tuple(texts) for task, texts in out.items()}


def texts(name: str) -> tuple[str, ...]:
    """Set `name`'s texts in file order."""
    return tuple(row["text"] for row in _rows(name))


def batch_of(name: str) -> dict[str, int]:
    """Each text of set `name` -> the batch (independently written part) it belongs to."""
    return {row["text"]: row["batch"] for row in _rows(name)}


def batches(name: str) -> tuple[dict[str, tuple[str, ...]], ...]:
    """Set `name` split by batch, in batch order, each as texts per task."""
    parts: dict[int, dict[str, list[str]]] = {}
    for row in _rows(name):
        parts.setdefault(row["batch"], {}).setdefault(row["task"], []).append(row["text"])
    return tuple({task: tuple(t) for task, t in parts[b].items()} for b in sorted(parts))
