"""The task file: one JSON object per line, shared with `../shared/data/cls-tasks/tasks.jsonl`.

Keys: `task` (name), `descriptions` (list) and/or `definition` (str), `instances`
([{input, output}]), optional `labels`, `split` (`train` | `heldout`), `cluster`. Extra
keys are kept in `extra`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoragenError


class TaskFileError(LoragenError, ValueError):
    """A task file or one of its lines is malformed."""


@dataclass
class Instance:
    input: str
    output: str


@dataclass
class Task:
    name: str
    descriptions: list[str]
    instances: list[Instance]
    labels: list[str] | None = None
    split: str = "train"
    cluster: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.descriptions[0]

    def split_instances(self, train_fraction: float = 0.7, seed: int = 0) -> tuple[list[Instance], list[Instance]]:
        """A deterministic train/test split (the same for every run and machine)."""
        items = list(self.instances)
        random.Random(f"{seed}:{self.name}").shuffle(items)
        cut = max(1, min(len(items) - 1, round(len(items) * train_fraction)))
        return items[:cut], items[cut:]

    def example_pairs(self, train_fraction: float = 0.7, seed: int = 0, limit: int | None = None) -> list[dict[str, str]]:
        """{input, output} pairs from the train split only (in-context examples never see test items)."""
        return [{"input": i.input, "output": i.output} for i in self.split_instances(train_fraction, seed)[0][:limit]]


def parse_task(obj: Any, where: str) -> Task:
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: expected a JSON object")
    name = obj.get("task")
    if not isinstance(name, str) or not name.strip():
        raise TaskFileError(f"{where}: missing 'task' (a non-empty name)")
    descriptions = obj.get("descriptions") or []
    if isinstance(obj.get("definition"), str) and obj["definition"] not in descriptions:
        descriptions = [obj["definition"], *descriptions]
    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
        raise TaskFileError(f"{where}: 'descriptions' must be a list of strings")
    descriptions = [d.strip() for d in descriptions if d.strip()]
    if not descriptions:
        raise TaskFileError(f"{where}: task {name!r} has no description ('descriptions' or 'definition')")
    raw = obj.get("instances")
    if not isinstance(raw, list) or not raw:
        raise TaskFileError(f"{where}: task {name!r} needs a non-empty 'instances' list")
    instances = []
    for i, inst in enumerate(raw):
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not isinstance(inst.get("output"), str):
            raise TaskFileError(f"{where}: instance {i} of {name!r} needs string 'input' and 'output'")
        instances.append(Instance(inst["input"], inst["output"]))
    labels = obj.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) < 2:
            raise TaskFileError(f"{where}: 'labels' must be a list of at least two strings")
        unknown = {inst.output for inst in instances} - set(labels)
        if unknown:
            raise TaskFileError(f"{where}: outputs {sorted(unknown)[:3]} of {name!r} are not in 'labels'")
    known = {"task", "descriptions", "definition", "instances", "labels", "split", "cluster"}
    return Task(
        name=name.strip(),
        descriptions=descriptions,
        instances=instances,
        labels=labels,
        split=str(obj.get("split", "train")),
        cluster=obj.get("cluster"),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def read_tasks(path: str | Path) -> list[Task]:
    """Read every task; the first bad line raises an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"no task file at {path}")
    tasks, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{where}: not valid JSON ({exc.msg})") from exc
            task = parse_task(obj, where)
            if task.name in seen:
                raise TaskFileError(f"{where}: duplicate task name {task.name!r}")
            seen.add(task.name)
            tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{path} holds no tasks")
    return tasks


def write_tasks(path: str | Path, tasks: Iterable[Task]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for t in tasks:
            obj: dict[str, Any] = {"task": t.name, "descriptions": t.descriptions,
                                   "instances": [{"input": i.input, "output": i.output} for i in t.instances],
                                   "split": t.split}
            if t.labels is not None:
                obj["labels"] = t.labels
            if t.cluster is not None:
                obj["cluster"] = t.cluster
            f.write(json.dumps({**obj, **t.extra}) + "\n")
