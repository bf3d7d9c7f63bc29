"""Causal-LM experts: input -> output text, loss on the output tokens only."""

from __future__ import annotations

import torch

from ..adapters import Basis, Rows
from ..basemodel import BaseModel
from .experts import ExpertConfig, ExpertRun, LossFn, train_in_basis
from .metrics import exact_match
from .tasks import Instance, Task


def causal_loss(base: BaseModel) -> LossFn:
    def loss(rows: Rows, task_rows: list[int], batch: list[Instance]) -> torch.Tensor:
        rows.set(task_rows)
        enc = base.encode_pairs([i.input for i in batch], [i.output for i in batch])
        enc = {k: v.to(base.device) for k, v in enc.items()}
        return base.model(**enc).loss

    return loss


def train_causal_experts(base: BaseModel, basis: Basis, tasks: list[Task], config: ExpertConfig) -> list[ExpertRun]:
    checkpoints = train_in_basis(basis, base.model, tasks, causal_loss(base), config, desc="causal experts")
    runs = [ExpertRun(t, c) for t, c in zip(tasks, checkpoints)]
    tests = [t.split_instances(config.train_fraction, config.seed)[1] for t in tasks]
    scores = exact_match(base, [r.lora(basis) for r in runs], tests)
    for run, score in zip(runs, scores):
        run.metrics["exact_match"] = score
    return runs
