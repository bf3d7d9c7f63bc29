"""More training tasks from the registry tasks' own training data (label-scoring tasks).

Zero-shot quality of a task-conditioned generator rises with the number of training tasks, and a
multi-class task holds several binary ones: "is the label X?" for each of its labels. Each derived
task's description is its source's definition plus a sentence that says what is asked, so the
generator must read the description to tell them apart. Only the source's training split is
used, so no test instance of any task reaches training through a derived one.
"""

from __future__ import annotations

from .tasks import Instance, Task

NEGATIVE, POSITIVE = "no", "yes"


def one_vs_rest(task: Task, train_fraction: float = 0.7, seed: int = 0) -> list[Task]:
    """For a task with three labels or more: one yes/no task per label, "is the label X?"."""
    labels = task.labels or []
    if len(labels) < 3:
        return []
    train = task.split_instances(train_fraction, seed)[0]
    out = []
    for label in labels:
        instances = [Instance(i.input, POSITIVE if i.output == label else NEGATIVE) for i in train]
        if len({i.output for i in instances}) < 2:
            continue
        text = f"{task.description} Here, answer {POSITIVE} if the answer would be '{label}', and {NEGATIVE} otherwise."
        out.append(Task(f"{task.name}:is:{label}", [text], instances, [NEGATIVE, POSITIVE], "derived", task.cluster,
                        {"source": task.name}))
    return out


def derived_tasks(tasks: list[Task], train_fraction: float = 0.7, seed: int = 0) -> list[Task]:
    """Every one-vs-rest task of `tasks` (which must all be training tasks)."""
    return [d for t in tasks for d in one_vs_rest(t, train_fraction, seed)]
