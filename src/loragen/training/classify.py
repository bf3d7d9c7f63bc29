"""Label-scoring experts on an encoder (cls-tasks): cross-entropy over cosine similarities.

Each step encodes every label string of the tasks in the batch under its task's B, then the
inputs under theirs, and scores each input against its own task's labels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import Basis, Rows
from ..encoder import EncoderModel, accuracy, score
from ..errors import LoragenError
from .experts import ExpertConfig, ExpertRun, LossFn, train_in_basis
from .tasks import Instance, Task

TEMPERATURE = 0.05  # sharpens cosine similarities into logits


def classify_loss(encoder: EncoderModel, tasks: list[Task]) -> LossFn:
    labels = [t.labels or [] for t in tasks]

    def loss(rows: Rows, task_rows: list[int], batch: list[Instance]) -> torch.Tensor:
        present = sorted(set(task_rows))
        rows.set([t for t in present for _ in labels[t]])
        label_vecs = encoder.embed([lab for t in present for lab in labels[t]])
        offsets, start = [(0, 0)] * len(tasks), 0
        for t in present:
            offsets[t] = (start, start + len(labels[t]))
            start += len(labels[t])
        input_vecs = encoder.embed_rows([inst.input for inst in batch], rows, task_rows)
        sims = score(input_vecs, label_vecs, offsets, task_rows)
        losses = [
            F.cross_entropy((s / TEMPERATURE).unsqueeze(0), torch.tensor([labels[t].index(inst.output)], device=s.device))
            for s, t, inst in zip(sims, task_rows, batch)
        ]
        return torch.stack(losses).mean()

    return loss


def train_classifier_experts(encoder: EncoderModel, basis: Basis, tasks: list[Task],
                             config: ExpertConfig) -> list[ExpertRun]:
    unlabelled = [t.name for t in tasks if not t.labels]
    if unlabelled:
        raise LoragenError(f"label-scoring tasks need 'labels'; missing for {', '.join(unlabelled[:5])}")
    trained = train_in_basis(basis, encoder.model, tasks, classify_loss(encoder, tasks), config,
                             desc="classifier experts")
    runs = [ExpertRun(t, c, trained.basis) for t, c in zip(tasks, trained.checkpoints)]
    tests = [t.split_instances(config.train_fraction, config.seed)[1] for t in tasks]
    scores = accuracy(encoder, [r.lora() for r in runs], [t.labels or [] for t in tasks], tests)
    base = accuracy(encoder, [None] * len(tasks), [t.labels or [] for t in tasks], tests)
    for run, s, b in zip(runs, scores, base):
        run.metrics.update(accuracy=s, base_accuracy=b)
    return runs
