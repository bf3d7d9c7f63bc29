"""Task-loss training of a learned generator: its LoRAs are judged by the base model's own loss.

Reconstruction teaches a generator to reproduce its experts' weights; it learns those points, not
a map from a new description to useful weights. Here each step draws a LoRA from the prior for a
few registry tasks, exactly as at inference (sg with its leave-one-out condition, so the task's
own expert is not retrievable), applies them to the frozen base model one per row, and
back-propagates the base model's loss on those tasks' training instances into the generator.

`reconstruction_weight` > 0 (`--objective mixed`) adds the reconstruction loss on the same
experts' checkpoints as a regulariser. `contrast_weight` > 0 adds a hinge that asks each step's
LoRAs, drawn from the tasks' own descriptions, to beat LoRAs drawn from descriptions of other
families' tasks on the same instances by `contrast_margin` (in loss units): a generator that ignores
its description cannot meet it. A share of the tasks (`validation_tasks`) is never trained
on: their task loss picks the step whose weights are kept, so the stopping point is chosen on
tasks the generator has not seen, as a held-out task will be.
"""

from __future__ import annotations

import copy
import io
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import LoraStack, applied, atomic
from ..errors import LoragenError
from ..generator import LearnedGenerator, train_generator
from ..registry import Registry
from .objective import TaskModel, matched_tasks
from .tasks import Instance, Task

TASK_STATE_NAME = "task_training_state.pt"


@dataclass
class TaskTrainingConfig:
    steps: int = 150  # optimiser steps
    tasks_per_step: int = 8  # registry tasks (one generated LoRA each) per step
    rows_per_task: int = 4  # training instances of each task per step
    lr: float = 1e-3
    reconstruction_weight: float = 0.0  # > 0: `mixed`, the reconstruction loss added with this weight
    contrast_weight: float = 0.0  # > 0: the own-versus-mismatched description hinge, with this weight
    contrast_margin: float = 0.1  # how much lower the own description's loss must be (nats)
    validation_tasks: float = 0.15  # share of matched tasks kept out of training to pick the step
    eval_every: int = 25  # steps between validations
    validation_rows: int = 8  # instances per validation task
    seed: int = 0
    train_fraction: float = 0.7  # the experts' split: only the first part is ever seen


class _Conditions:
    """Per training task, its descriptions' condition inputs, built as inference builds them:
    embedded and searched in the generator's space, with the task's own expert (if it has one)
    left out of the search, so sg's prior is the leave-one-out mixture of its neighbours."""

    def __init__(self, gen: LearnedGenerator, tasks: list[Task], descriptions: list[list[str]]) -> None:
        experts = {e.name: e.id for e in gen.registry.experts()}
        texts = [d for ds in descriptions for d in ds]
        owner = [i for i, ds in enumerate(descriptions) for _ in ds]
        query = gen.embed(texts)
        hits = gen.search(query, own=[experts.get(tasks[o].name) for o in owner])
        self.text, self.mu, self.sigma, _ = gen.conditions(query, hits)
        if gen.task_vector_dim:  # no examples: the task vector part and its flag are zero
            self.text = torch.cat([self.text, self.text.new_zeros(len(texts), gen.task_vector_dim + 1)], dim=-1)
        self.tasks = tasks
        self.rows = [[j for j, o in enumerate(owner) if o == i] for i in range(len(tasks))]

    def inputs(self, rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]:
        mu = [m[rows] for m in self.mu] if self.mu is not None else None
        sigma = [s[rows] for s in self.sigma] if self.sigma is not None else None
        return self.text[rows], mu, sigma


def task_loss(gen: LearnedGenerator, base: TaskModel, cond: _Conditions, columns: list[int], rows: list[int],
              batches: list[list[Instance]], eps: torch.Tensor) -> torch.Tensor:
    """The base model's loss under one generated LoRA per task (`columns` index `cond.tasks`; each
    conditioned on its description `rows`), each on its own instances; differentiable in the generator."""
    model = gen.model
    text, mu, sigma = cond.inputs(rows)
    groups = model.sample(text, mu, sigma, eps)
    B = model.layout.to_modules(groups)  # module -> (tasks, L, out, r)
    B, _ = gen.safety.clip(B)  # the norm range inference enforces, so training sees what users get
    basis = gen.registry.basis
    device = next(base.module.parameters()).device  # the generator may sit on another device than the base
    stack = LoraStack(basis.spec, {m: a.to(device, text.dtype) for m, a in basis.A.items()},
                      {m: b.to(device) for m, b in B.items()})
    tasks = [cond.tasks[c] for c in columns]
    task_rows = [i for i, b in enumerate(batches) for _ in b]
    with applied(base.module, stack) as hooks:
        return base.loss_fn(tasks)(hooks, task_rows, [inst for b in batches for inst in b])


def train_on_task_loss(gen: LearnedGenerator, tasks: list[Task], base: TaskModel,
                       config: TaskTrainingConfig | None = None, *, derived: Sequence[Task] = (),
                       state_path: Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `gen.model` in place on the task loss of the registry tasks in `tasks` (matched by
    name), plus `derived` tasks that have no expert (made from registry tasks' training data,
    conditioned on their own descriptions). The base model's weights are never changed.
    Returns the training record."""
    config = config or TaskTrainingConfig()
    matched = matched_tasks(gen.registry, tasks)
    every = matched + list(derived)
    base.check(every)
    descriptions = [gen.registry.get(t.name).descriptions for t in matched] + [t.descriptions for t in derived]
    cond = _Conditions(gen, every, descriptions)
    if len(every) < 2:
        raise LoragenError("task-loss training needs at least two tasks with instances")
    rng = random.Random(config.seed)
    # Validation tasks come from the registry's own, and tasks derived from them train only when
    # their source is not a validation task (a derived task names its source in `extra["source"]`).
    shuffled = rng.sample(range(len(matched)), len(matched))
    n_val = min(len(shuffled) - 1, round(len(shuffled) * config.validation_tasks))
    val_cols = sorted(shuffled[:n_val])
    held = {every[c].name for c in val_cols}
    train_cols = [c for c in range(len(every)) if c not in val_cols and every[c].extra.get("source") not in held]
    pools = {c: every[c].split_instances(config.train_fraction, config.seed)[0] for c in range(len(every))}
    family = [t.cluster or t.extra.get("source") or t.name for t in every]
    mismatch = {c: [o for o in train_cols if family[o] != family[c]] or [o for o in train_cols if o != c]
                for c in train_cols}
    val_batches = [random.Random(f"{config.seed}:{c}").sample(pools[c], min(config.validation_rows, len(pools[c])))
                   for c in val_cols]
    model = gen.model
    model.requires_grad_(True)
    base.module.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    noise = torch.Generator().manual_seed(config.seed)
    state: dict[str, Any] = {"step": 0, "best": math.inf, "best_step": 0, "history": []}
    best = copy.deepcopy(model.state_dict())
    if resume and state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        sched.load_state_dict(saved["sched"])
        noise.set_state(saved["noise"])
        rng.setstate(saved["rng"])
        best, state = saved["best_model"], saved["state"]
    latent = model.config.latent

    def validate() -> float:
        if not val_cols:
            return math.nan
        model.eval()
        with torch.no_grad():
            rows = [cond.rows[c][0] for c in val_cols]
            eps = torch.zeros(len(val_cols), latent)  # the prior mean: a repeatable score
            loss = float(task_loss(gen, base, cond, val_cols, rows, val_batches, eps))
        model.train()
        return loss

    if state["step"] == 0:  # the initial weights are a candidate too (a residual starts at the multi-task LoRA)
        state["initial_validation"] = state["best"] = validate() if val_cols else math.inf
    bar = tqdm(range(state["step"], config.steps), desc=f"task loss {gen.method}", unit="step", disable=not progress)
    model.train()
    for step in bar:
        cols = rng.sample(train_cols, min(config.tasks_per_step, len(train_cols)))
        rows = [rng.choice(cond.rows[c]) for c in cols]
        batches = [rng.choices(pools[c], k=config.rows_per_task) for c in cols]
        eps = torch.randn(len(cols), latent, generator=noise)
        loss = task_loss(gen, base, cond, cols, rows, batches, eps)
        if config.contrast_weight > 0:
            others = [rng.choice(cond.rows[rng.choice(mismatch[c])]) for c in cols]
            wrong = task_loss(gen, base, cond, cols, others, batches, eps)
            loss = loss + config.contrast_weight * torch.relu(config.contrast_margin + loss - wrong)
        if config.reconstruction_weight > 0:
            loss = loss + config.reconstruction_weight * reconstruction_loss(gen, cond, cols, rows, rng, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state["step"] = step + 1
        record: dict[str, Any] = {"step": step + 1, "train": round(float(loss.detach()), 5)}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            val = validate()
            record["val"] = round(val, 5)
            if not val_cols or val < state["best"]:
                state["best"], state["best_step"] = val, step + 1
                best = copy.deepcopy(model.state_dict())
            if state_path is not None:
                _save_state(state_path, model, best, opt, sched, noise, rng, state)
        state["history"].append(record)
        bar.set_postfix(loss=f"{record['train']:.3f}", val=f"{state['best']:.3f}")
    model.load_state_dict(best)
    model.eval()
    return {"objective": "mixed" if config.reconstruction_weight > 0 else "task", "config": asdict(config),
            "tasks": len(every), "derived_tasks": len(derived), "validation_tasks": [every[c].name for c in val_cols],
            "initial_validation": state.get("initial_validation"), "best_validation": state["best"],
            "best_step": state["best_step"], "history": state["history"]}


def reconstruction_loss(gen: LearnedGenerator, cond: _Conditions, cols: list[int], rows: list[int],
                        rng: random.Random, noise: torch.Generator) -> torch.Tensor:
    """The CVAE's own loss on one random checkpoint of each task's expert, under the same
    conditions; derived tasks (no expert) are left out of it."""
    tokens, owner = gen.expert_tokens()
    column = {e.name: i for i, e in enumerate(gen.experts())}
    pairs = [(c, r) for c, r in zip(cols, rows) if cond.tasks[c].name in column]
    if not pairs:
        return torch.zeros(())
    cps = torch.tensor([rng.choice((owner == column[cond.tasks[c].name]).nonzero().flatten().tolist())
                        for c, _ in pairs])
    text, mu, sigma = cond.inputs([r for _, r in pairs])
    eps = torch.randn(len(pairs), gen.model.config.latent, generator=noise)
    return gen.model.loss([t[cps] for t in tokens], text, mu, sigma, eps)[0]


def _save_state(path: Path, model: nn.Module, best: dict[str, Any], opt: torch.optim.Optimizer, sched: Any,
                noise: torch.Generator, rng: random.Random, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "best_model": best, "optim": opt.state_dict(), "sched": sched.state_dict(),
                "noise": noise.get_state(), "rng": rng.getstate(), "state": state}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buf.getvalue())


OBJECTIVES = ("reconstruction", "task", "mixed")


def train_generator_for(objective: str, registry: Registry, method: str, tasks: list[Task] | None,
                        base: TaskModel | None, task_config: TaskTrainingConfig | None = None, *,
                        residual: bool = False, derived: Sequence[Task] = (), out_dir: str | Path | None = None,
                        resume: bool = False,
                        **reconstruction: Any) -> LearnedGenerator:
    """`train_generator` under an objective:
    - `reconstruction`: fit expert checkpoints only (`reconstruction` holds its settings);
    - `task`: no reconstruction fit; the base model's task loss from the initial model;
    - `mixed`: the reconstruction fit, then the task loss with the reconstruction loss added
      (`task_config.reconstruction_weight`, 1.0 if unset).
    `residual` (task only) decodes on top of the registry's multi-task LoRA."""
    if objective not in OBJECTIVES:
        raise LoragenError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if residual and objective != "task":
        raise LoragenError("--residual needs --objective task")
    if objective == "reconstruction":
        return train_generator(registry, method, out_dir=out_dir, resume=resume, residual=False, **reconstruction)
    if tasks is None or base is None:
        raise LoragenError(f"objective {objective!r} needs a task file (--tasks) with the registry tasks' instances")
    config = task_config or TaskTrainingConfig()
    if objective == "mixed" and config.reconstruction_weight <= 0:
        config = replace(config, reconstruction_weight=1.0)
    if objective == "task":
        config = replace(config, reconstruction_weight=0.0)
        reconstruction = {**reconstruction, "epochs": 0}
    gen = train_generator(registry, method, out_dir=None, residual=residual, **reconstruction)
    state = Path(out_dir) / TASK_STATE_NAME if out_dir is not None else None
    record = train_on_task_loss(gen, tasks, base, config, derived=derived, state_path=state, resume=resume,
                                progress=bool(reconstruction.get("progress", True)))
    gen.config.objective = objective
    gen.config.task_training = {k: v for k, v in record.items() if k != "history"}
    if out_dir is not None:
        gen.save_pretrained(out_dir)
    return gen
