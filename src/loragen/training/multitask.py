"""The multi-task LoRA: one B in the registry's basis, trained on every registry task's training data.

It is the honest baseline for tasks outside the registry (one adapter that knows all seen tasks
at once, and reads no description), and the point the learned generators may predict a residual
over. Training is expert training with one B shared by every task (`train_in_basis(shared=True)`):
each step holds `rows_per_task` rows of every task, so no task dominates by its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Lora
from ..errors import LoragenError
from ..registry import Registry
from .experts import ExpertConfig, train_in_basis
from .objective import TaskModel, matched_tasks
from .tasks import Task


@dataclass
class MultitaskConfig:
    steps: int = 200  # optimiser steps; each sees every task
    lr: float = 1e-2
    rows_per_task: int = 1  # rows of each task per step
    warmup: int = 20
    seed: int = 0
    train_fraction: float = 0.7  # the split the experts used: only the first part is trained on


def train_multitask(registry: Registry, tasks: list[Task], base: TaskModel,
                    config: MultitaskConfig | None = None) -> Lora:
    """One LoRA trained on the training instances of every registry expert's task (matched by name).
    Tasks the registry has no expert for are left out, so held-out tasks never reach it."""
    config = config or MultitaskConfig()
    seen = matched_tasks(registry, tasks)
    base.check(seen)
    expert = ExpertConfig(steps=config.steps, lr=config.lr, rows_per_task=config.rows_per_task, checkpoints=1,
                          checkpoint_every=1, warmup=config.warmup, seed=config.seed,
                          train_fraction=config.train_fraction)
    trained = train_in_basis(registry.basis, base.module, seen, base.loss_fn(seen), expert,
                             desc="multi-task LoRA", shared=True)
    B = {m: b.clone() for m, b in trained.checkpoints[0][-1].items()}
    if not all(torch.isfinite(b).all() for b in B.values()):
        raise LoragenError("multi-task training diverged (non-finite weights); lower --lr")
    return registry.basis.lora(B, {"method": "multitask", "tasks": [t.name for t in seen],
                                   "steps": config.steps, "seed": config.seed})
