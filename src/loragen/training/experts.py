"""Expert training in the shared basis: only B is trained, every task in the same forward pass.

Because every expert shares the frozen A of the basis, one batch can hold rows of all tasks, each
row adding its own task's B (see `adapters.apply`). Each step samples the same number of rows per
task, so each expert gets the gradient it would get alone; Adam keeps them independent.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Basis, Lora, LoraStack, Rows, applied
from .tasks import Instance, Task


@dataclass
class ExpertConfig:
    steps: int = 300
    lr: float = 1e-2
    rows_per_task: int = 8
    checkpoints: int = 5  # keep the last M checkpoints (the generators train on them)
    checkpoint_every: int = 10
    warmup: int = 20
    seed: int = 0
    train_fraction: float = 0.7
    # Extra row blocks per step for tasks that learn slower, by task name (e.g. {"reverse": 1}).
    oversample: dict[str, int] = field(default_factory=dict)
    # Causal experts: forward passes per step, each over rows of similar length (less padding);
    # the step's loss is the same mean over all its output tokens.
    length_passes: int = 1


@dataclass
class ExpertRun:
    task: Task
    checkpoints: list[dict[str, torch.Tensor]]  # oldest first; the last is the final expert
    metrics: dict[str, float] = field(default_factory=dict)

    def lora(self, basis: Basis) -> Lora:
        return basis.lora(self.checkpoints[-1], {"expert": self.task.name})


# loss(rows, task_rows, batch): sets `rows` for each forward pass it runs under the hooks.
LossFn = Callable[[Rows, list[int], list[Instance]], torch.Tensor]


def train_in_basis(
    basis: Basis,
    model: nn.Module,
    tasks: list[Task],
    loss_fn: LossFn,
    config: ExpertConfig,
    *,
    desc: str = "experts",
    shared: bool = False,
) -> list[list[dict[str, torch.Tensor]]]:
    """Train one B per task; `loss_fn` runs the model under the hooks and returns the loss.

    `shared`: one B for all tasks (a multi-task LoRA); every task's rows then read the same
    parameters, and each returned task's checkpoints are the same tensors."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    spec = basis.spec
    device = next(model.parameters()).device
    params = {
        m.name: nn.Parameter(torch.zeros(1 if shared else len(tasks), spec.num_layers, m.out_features, spec.rank,
                                         device=device))
        for m in spec.modules
    }
    # Shared: every task index reads row 0 (an expanded view, so gradients from all tasks meet there).
    views = {m: p.expand(len(tasks), *p.shape[1:]) for m, p in params.items()} if shared else params
    stack = LoraStack(spec, {m: a.to(device) for m, a in basis.A.items()}, views)
    optim = torch.optim.Adam(params.values(), lr=config.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / config.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    # Extra blocks go after one block per task, so every block has the same size (the bmm path).
    extra = [t for t, task in enumerate(tasks) for _ in range(config.oversample.get(task.name, 0))]
    blocks = list(range(len(tasks))) + extra
    pools = [t.split_instances(config.train_fraction, config.seed)[0] for t in tasks]
    keep_from = config.steps - (config.checkpoints - 1) * config.checkpoint_every
    saved: list[dict[str, torch.Tensor]] = []  # each: module -> (E, L, out, r)
    model.requires_grad_(False)
    with applied(model, stack) as rows:
        for step in tqdm(range(1, config.steps + 1), desc=desc, unit="step", leave=False):
            task_rows, batch = [], []
            for t in blocks:
                for inst in rng.choices(pools[t], k=config.rows_per_task):
                    task_rows.append(t)
                    batch.append(inst)
            loss = loss_fn(rows, task_rows, batch)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            if step >= keep_from and (step - keep_from) % config.checkpoint_every == 0:
                saved.append({k: v.detach().to("cpu", copy=True) for k, v in params.items()})
    return [[{k: v[0 if shared else t] for k, v in ckpt.items()} for ckpt in saved] for t in range(len(tasks))]
