"""Batch input: one JSON object per line, either a batch item or a task-file line.

A batch item is `{id, description, examples?, instances?, labels?, methods?, group?, split?}`.
A line with `task` and no `id` is read as a task-file line (`training.tasks.parse_task`): its id is
the task name, its description the first one (the definition), its instances the test part of
the deterministic train/test split, its group the cluster.

Reading never stops at a bad line: each one becomes an `ItemError` naming the line and what is
wrong, and the other lines are read as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoragenError
from ..training.tasks import Instance, TaskFileError, parse_task

MAX_DESCRIPTION_CHARS = 4000


@dataclass(frozen=True)
class BatchItem:
    id: str
    description: str
    line: int
    examples: tuple[dict[str, str], ...] | None = None
    instances: tuple[Instance, ...] | None = None
    labels: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None  # overrides the run's methods for this item
    group: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class ItemError:
    line: int
    id: str | None
    message: str

    @property
    def key(self) -> str:
        """How the manifest names it: its id when the line had one, else `line:N`."""
        return self.id if self.id is not None else f"line:{self.line}"


class ItemFormatError(LoragenError, ValueError):
    """One input line cannot be used."""


def _pairs(value: Any, field: str) -> tuple[dict[str, str], ...]:
    ok = isinstance(value, list) and all(
        isinstance(v, dict) and isinstance(v.get("input"), str) and isinstance(v.get("output"), str) for v in value)
    if not ok:
        raise ItemFormatError(f"'{field}' must be a list of {{\"input\": str, \"output\": str}} objects")
    return tuple({"input": v["input"], "output": v["output"]} for v in value)


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ItemFormatError(f"'{field}' must be a non-empty string or list of strings")
    return tuple(v.strip() for v in value)


def _optional_str(obj: dict[str, Any], *fields: str) -> str | None:
    for f in fields:
        if obj.get(f) is not None:
            return str(obj[f])
    return None


def _check_description(description: Any) -> str:
    if not isinstance(description, str) or not description.strip():
        raise ItemFormatError("missing field 'description' (a non-empty string)")
    description = description.strip()
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ItemFormatError(f"description has {len(description)} characters; the limit is {MAX_DESCRIPTION_CHARS}")
    return description


def parse_item(obj: Any, line: int, *, train_fraction: float = 0.7, seed: int = 0) -> BatchItem:
    """One line's object as a `BatchItem`; raises `ItemFormatError` with a message for the manifest."""
    if not isinstance(obj, dict):
        raise ItemFormatError("expected a JSON object")
    if "task" in obj and "id" not in obj:
        try:
            task = parse_task(obj, f"line {line}")
        except TaskFileError as exc:
            raise ItemFormatError(str(exc).removeprefix(f"line {line}: ")) from exc
        return BatchItem(id=task.name, description=_check_description(task.description), line=line,
                         instances=tuple(task.split_instances(train_fraction, seed)[1]),
                         labels=tuple(task.labels) if task.labels else None,
                         group=task.cluster, split=task.split)
    raw_id = obj.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise ItemFormatError("missing field 'id' (a non-empty string)")
    description = _check_description(obj.get("description"))
    examples = _pairs(obj["examples"], "examples") if obj.get("examples") is not None else None
    instances = None
    if obj.get("instances") is not None:
        instances = tuple(Instance(p["input"], p["output"]) for p in _pairs(obj["instances"], "instances"))
    labels = _strings(obj["labels"], "labels") if obj.get("labels") is not None else None
    method_field = "methods" if obj.get("methods") is not None else "method"
    methods = _strings(obj[method_field], method_field) if obj.get(method_field) is not None else None
    return BatchItem(id=raw_id.strip(), description=description, line=line, examples=examples,
                     instances=instances, labels=labels, methods=methods,
                     group=_optional_str(obj, "group", "cluster"), split=_optional_str(obj, "split"))


def read_items(path: str | Path, *, train_fraction: float = 0.7, seed: int = 0) -> list[BatchItem | ItemError]:
    """Every non-blank line of `path`, in order, as an item or an error (duplicate ids are errors)."""
    path = Path(path)
    if not path.is_file():
        raise LoragenError(f"no input file at {path}")
    out: list[BatchItem | ItemError] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                out.append(ItemError(number, None, f"line {number}: not valid JSON ({exc.msg})"))
                continue
            guess = obj.get("id", obj.get("task")) if isinstance(obj, dict) else None
            guess = str(guess).strip() if isinstance(guess, (str, int)) and str(guess).strip() else None
            try:
                item = parse_item(obj, number, train_fraction=train_fraction, seed=seed)
            except ItemFormatError as exc:
                # An id that an earlier good line owns must not shadow that line's records.
                own = guess if guess is not None and guess not in first_line else None
                if own is not None:
                    first_line[own] = number
                out.append(ItemError(number, own, f"line {number}: {exc}"))
                continue
            if item.id in first_line:
                out.append(ItemError(number, None,
                                     f"line {number}: duplicate id {item.id!r} (first on line {first_line[item.id]})"))
                continue
            first_line[item.id] = number
            out.append(item)
    return out
