"""Causal-LM experts: input -> output text, loss on the output tokens only."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import Basis, Rows
from ..basemodel import BaseModel
from .experts import ExpertConfig, ExpertRun, LossFn, train_in_basis
from .metrics import exact_match
from .parallel import Group, run_parallel
from .tasks import Instance, Task

# A pass over fewer rows costs more in per-pass overhead than its padding saves.
MIN_ROWS_PER_PASS = 64


def output_loss(base: BaseModel, inputs: list[str], outputs: list[str], *, passes: int = 1,
                rows: Rows | None = None, task_rows: list[int] | None = None, block: int = 1) -> torch.Tensor:
    """The mean NLL per output token (eos included) over all pairs, as one padded forward pass gives.

    The pairs run in up to `passes` forward passes of pairs of similar length, so that little of
    each pass is padding. With `rows`, each pass sets it to its pairs' `task_rows` (per-row LoRAs).
    `block`: the pairs come in consecutive blocks of this size, one LoRA each (how expert training
    lays out a step); each pass then keeps equal blocks, which the LoRA hooks run as one bmm."""
    pairs = base.pair_ids(inputs, outputs)
    groups = _passes([len(ids) for ids, _ in pairs], block, max(1, min(passes, len(pairs) // MIN_ROWS_PER_PASS)))
    total, tokens = torch.zeros((), device=base.device), 0
    for part, size in groups:
        enc = {n: v.to(base.device) for n, v in base.pad_pairs([pairs[i] for i in part]).items()}
        if rows is not None:
            assert task_rows is not None, "rows need the task_rows to set"
            rows.set([task_rows[i] for i in part], block=size)
        logits = base.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        labels = enc["labels"][:, 1:]  # (b, s-1): token t+1 is predicted at t
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=-100, reduction="sum")
        tokens += int((labels != -100).sum())
    return total / max(1, tokens)


def _passes(lengths: list[int], block: int, passes: int) -> list[tuple[list[int], int]]:
    """Each pass's row indices and the size of its blocks. Each block, sorted by length, is cut into
    `passes` slices; the slices, sorted by their longest row, are dealt into the passes in order.
    Rows not in equal blocks are single-row slices."""
    n = len(lengths)
    size = block // passes if block % passes == 0 and n % block == 0 else 1
    block = block if size > 1 else 1
    units = []
    for start in range(0, n, block):
        by_length = sorted(range(start, start + block), key=lengths.__getitem__)  # stable
        units += [by_length[i : i + size] for i in range(0, block, size)]
    units.sort(key=lambda u: lengths[u[-1]])
    cuts = [k * len(units) // passes for k in range(passes + 1)]
    return [([i for u in units[a:b] for i in u], size) for a, b in zip(cuts, cuts[1:]) if b > a]


def causal_loss(base: BaseModel, passes: int = 1, block: int = 1) -> LossFn:
    def loss(rows: Rows, task_rows: list[int], batch: list[Instance]) -> torch.Tensor:
        return output_loss(base, [i.input for i in batch], [i.output for i in batch], passes=passes,
                           rows=rows, task_rows=task_rows, block=block)

    return loss


def train_causal_experts(base: BaseModel, basis: Basis, tasks: list[Task], config: ExpertConfig,
                         group: Group | None = None) -> list[ExpertRun]:
    """One expert per task (`experts.train_in_basis`), with each one's exact match on its test split.

    `group`: run as one of data-parallel processes (`parallel.Team`); each also scores its share of
    the tasks, and all return every run. Without one, `config.workers` > 1 and a base model saved at
    `base.path` start that many processes here, each loading the base from there."""
    if group is None and config.workers > 1 and (Path(base.path) / "config.json").is_file():
        return run_parallel(config.workers, _train_and_score, base.path, basis, tasks, config)
    return _train_and_score(group, base, basis, tasks, config)


def _train_and_score(group: Group | None, base: BaseModel | str, basis: Basis, tasks: list[Task],
                     config: ExpertConfig) -> list[ExpertRun]:
    base = BaseModel.load(base) if isinstance(base, str) else base
    loss = causal_loss(base, config.length_passes, config.rows_per_task)  # a step: one block of rows per task
    trained = train_in_basis(basis, base.model, tasks, loss, config, desc="causal experts", group=group)
    runs = [ExpertRun(t, c, trained.basis) for t, c in zip(tasks, trained.checkpoints)]
    mine = group.share(len(tasks)) if group else list(range(len(tasks)))
    tests = [runs[i].task.split_instances(config.train_fraction, config.seed)[1] for i in mine]
    scores = dict(zip(mine, exact_match(base, [runs[i].lora() for i in mine], tests)))
    if group:
        scores = {i: v for part in group.gather(list(scores.items())) for i, v in part}
    for i, run in enumerate(runs):
        run.metrics["exact_match"] = scores[i]
    return runs
