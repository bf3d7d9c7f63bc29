"""Expert training in the shared basis: one B per task, every task in the same forward pass.

Because every expert shares the A of the basis, one batch can hold rows of all tasks, each row
adding its own task's B (see `adapters.apply`). Each step samples the same number of rows per task,
so each expert gets the gradient it would get alone; Adam keeps them independent.

A registry's founding experts may also learn the basis itself (`ExpertConfig.basis_lr`): A then
trains with every B, and is frozen from then on (DESIGN §4's data-driven basis, learned rather than
fitted). Experts in a learned basis reach a given quality in fewer steps than in a seeded one (see
`benchmarks/RESULTS.md`, demo world).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from einops import einsum
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Basis, Lora, LoraStack, Rows, applied
from ..errors import LoragenError
from .parallel import Group
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
    # Learn the shared A with the experts, at this learning rate (None: A stays as given). The
    # returned basis has orthonormal rows again; each checkpoint's B is carried over to it exactly.
    basis_lr: float | None = None
    # Tasks whose rows read A but do not move it (their B still trains): the tasks an evaluation
    # holds out, so the basis knows nothing of them.
    basis_frozen_for: tuple[str, ...] = ()
    # One-thread processes to train in (`training.parallel`), each over its share of every step's
    # row blocks. Each process's loss is the mean over its own rows' tokens weighted by its share of
    # the rows: the one-process loss when rows are of equal length, a close variant otherwise.
    workers: int = 1


@dataclass
class BasisTraining:
    basis: Basis  # the basis the checkpoints live in: the one given, or the learned one
    checkpoints: list[list[dict[str, torch.Tensor]]]  # per task, oldest first


@dataclass
class ExpertRun:
    task: Task
    checkpoints: list[dict[str, torch.Tensor]]  # oldest first; the last is the final expert
    basis: Basis
    metrics: dict[str, float] = field(default_factory=dict)

    def lora(self) -> Lora:
        return self.basis.lora(self.checkpoints[-1], {"expert": self.task.name})


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
    group: Group | None = None,
) -> BasisTraining:
    """Train one B per task (and A too with `config.basis_lr`); `loss_fn` runs the model under the
    hooks and returns the loss.

    `shared`: one B for all tasks (a multi-task LoRA); every task's rows then read the same
    parameters, and each returned task's checkpoints are the same tensors.
    `group`: this process's place among data-parallel processes (`training.parallel`); each runs
    its share of the row blocks and they sum their gradients."""
    if config.basis_lr is not None and shared:
        raise LoragenError("a multi-task LoRA trains in the registry's basis; it cannot learn one")
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
    A = {m: nn.Parameter(a.to(device, copy=True), requires_grad=config.basis_lr is not None)
         for m, a in basis.A.items()}
    frozen = torch.tensor([t.name in config.basis_frozen_for for t in tasks]) if config.basis_frozen_for else None
    stack = LoraStack(spec, A, views, a_frozen=frozen)
    groups = [{"params": list(params.values())}]
    if config.basis_lr is not None:
        groups.append({"params": list(A.values()), "lr": config.basis_lr})
    optim = torch.optim.Adam(groups, lr=config.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / config.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    # Extra blocks go after one block per task, so every block has the same size (the bmm path).
    extra = [t for t, task in enumerate(tasks) for _ in range(config.oversample.get(task.name, 0))]
    blocks = list(range(len(tasks))) + extra
    pools = [t.split_instances(config.train_fraction, config.seed)[0] for t in tasks]
    keep_from = config.steps - (config.checkpoints - 1) * config.checkpoint_every
    saved: list[dict[str, torch.Tensor]] = []  # each: module -> (E, L, out, r)
    mine = group.share(len(blocks)) if group else list(range(len(blocks)))
    trained = [*params.values(), *(A.values() if config.basis_lr is not None else [])]
    model.requires_grad_(False)
    with applied(model, stack) as rows:
        for step in tqdm(range(1, config.steps + 1), desc=desc, unit="step", leave=False,
                         disable=bool(group and group.rank)):
            # every process draws the whole step, so the random stream is the same in each
            drawn = [rng.choices(pools[t], k=config.rows_per_task) for t in blocks]
            task_rows = [blocks[b] for b in mine for _ in drawn[b]]
            batch = [inst for b in mine for inst in drawn[b]]
            loss = loss_fn(rows, task_rows, batch) * (len(mine) / len(blocks))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if group:
                group.sum_grads(trained)
            optim.step()
            sched.step()
            if step >= keep_from and (step - keep_from) % config.checkpoint_every == 0:
                saved.append({k: v.detach().to("cpu", copy=True) for k, v in params.items()})
    if config.basis_lr is not None:
        basis, carry = Basis(spec, {m: a.detach().cpu() for m, a in A.items()}).orthonormalized()
        saved = [{k: carry_b(v, carry[k]) for k, v in ckpt.items()} for ckpt in saved]
    checkpoints = [[{k: v[0 if shared else t] for k, v in ckpt.items()} for ckpt in saved] for t in range(len(tasks))]
    return BasisTraining(basis, checkpoints)


def carry_b(b: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """(E, L, out, r) Bs over a basis -> the same ΔWs over its orthonormalized form; carry is (L, r, r)."""
    return einsum(b.double(), carry, "e l o r, l r s -> e l o s").float().contiguous()
