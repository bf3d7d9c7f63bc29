"""The base model's own task loss, shared by the multi-task LoRA and task-loss generator training.

`TaskModel` wraps the frozen base a registry's LoRAs are for: label-scoring cross-entropy over
the label set for encoders (`classify.py`), token NLL of the output for causal LMs (`causal.py`).
`matched_tasks` pairs a task file's tasks with the registry's experts by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..basemodel import BaseModel
from ..encoder import EncoderModel
from ..registry import Registry
from .experts import LossFn
from .tasks import Task, TaskFileError


@dataclass
class TaskModel:
    """A frozen base model and the loss its tasks are trained with."""

    kind: str  # "classify" (encoder, label scoring) | "causal" (token NLL)
    model: EncoderModel | BaseModel

    @classmethod
    def for_registry(cls, registry: Registry, base: str | Path | None = None, *, device: str = "cpu") -> TaskModel:
        """The registry's base model (`base` overrides the path its spec records)."""
        path = base or registry.spec.base_model
        if registry.spec.task_type == "CAUSAL_LM":
            return cls("causal", BaseModel.load(path, device=device))
        return cls("classify", EncoderModel.load(path, device=device))

    @property
    def module(self) -> nn.Module:
        return self.model.model

    def loss_fn(self, tasks: list[Task]) -> LossFn:
        """loss(rows, task_rows, batch) with `task_rows` indexing `tasks` (and the LoRA stack)."""
        if self.kind == "causal":
            from .causal import causal_loss

            assert isinstance(self.model, BaseModel)
            return causal_loss(self.model)
        from .classify import classify_loss

        assert isinstance(self.model, EncoderModel)
        return classify_loss(self.model, tasks)

    def check(self, tasks: list[Task]) -> None:
        if self.kind == "classify":
            unlabelled = [t.name for t in tasks if not t.labels]
            if unlabelled:
                raise TaskFileError(f"label scoring needs 'labels'; missing for {', '.join(unlabelled[:5])}")


def matched_tasks(registry: Registry, tasks: list[Task]) -> list[Task]:
    """The tasks that name a registry expert, in the registry's order; an error if none does."""
    by_name = {t.name: t for t in tasks}
    matched = [by_name[e.name] for e in registry.experts() if e.name in by_name]
    if not matched:
        raise TaskFileError(f"none of the {len(tasks)} tasks in the task file names an expert of the registry "
                            f"at {registry.path}; tasks are matched to experts by name")
    return matched
