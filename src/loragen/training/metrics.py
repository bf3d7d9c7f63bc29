"""A LoRA's score on task instances under a causal LM: greedy exact match and output NLL.

Expert training reports each expert's held-out exact match with these, and evaluation scores
generated LoRAs with the same functions, so the two figures are comparable. (Label scoring's
accuracy is `loragen.encoder.accuracy`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..adapters import Lora, LoraStack
from ..basemodel import BaseModel
from .tasks import Instance


def _flatten(instances: Sequence[Sequence[Instance]]) -> list[tuple[int, Instance]]:
    return [(i, inst) for i, group in enumerate(instances) for inst in group]


def exact_match(
    base: BaseModel,
    loras: Sequence[Lora | None],
    instances: Sequence[Sequence[Instance]],
    *,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> list[float]:
    """Per group i: the fraction of `instances[i]` whose greedy output under `loras[i]` is exact."""
    pairs = _flatten(instances)
    if max_new_tokens is None:
        longest = max((len(base.tokenizer(p.output, add_special_tokens=False)["input_ids"]) for _, p in pairs), default=1)
        max_new_tokens = longest + 2
    hits = [0] * len(loras)
    for start in tqdm(range(0, len(pairs), batch_size), desc="exact match", unit="batch", leave=False):
        chunk = pairs[start : start + batch_size]
        outs = base.complete([p.input for _, p in chunk], loras=[loras[g] for g, _ in chunk],
                             max_new_tokens=max_new_tokens)
        for (g, p), out in zip(chunk, outs):
            hits[g] += out.strip() == p.output.strip()
    return [h / max(1, len(group)) for h, group in zip(hits, instances)]


def output_nll(
    base: BaseModel,
    loras: Sequence[Lora | None],
    instances: Sequence[Sequence[Instance]],
    *,
    batch_size: int = 256,
) -> list[float]:
    """Per group: mean negative log-likelihood per output token (eos included)."""
    pairs = _flatten(instances)
    present = [lo for lo in loras if lo is not None]
    index_of = {id(lo): n for n, lo in enumerate(present)}
    stack = LoraStack.from_loras(present) if present else None
    rows = [-1 if loras[g] is None else index_of[id(loras[g])] for g, _ in pairs]
    logp, count = base.output_logprobs([p.input for _, p in pairs], [p.output for _, p in pairs],
                                       stack=stack, rows=rows, batch_size=batch_size)
    owner = torch.tensor([g for g, _ in pairs], dtype=torch.long)
    total = torch.zeros(len(loras), dtype=torch.float64).index_add_(0, owner, -logp)
    tokens = torch.zeros(len(loras), dtype=torch.long).index_add_(0, owner, count)
    return (total / tokens.clamp(min=1)).tolist()
