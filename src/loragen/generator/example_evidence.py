"""A request's examples as evidence for which of its top-K experts the description means.

`weighted`, `icm` and `sg` read a description as α = softmax(sim/τ) over its top-K experts: a
belief about which expert it asks for. When the request brings input/output examples, the base
model can check that belief: each candidate expert's LoRA gives the examples a likelihood. Bayes'
rule with the description's softmax as the prior gives

    α_k ∝ exp(sim_k / τ + log p(examples | expert k)),

log p summed over the examples' output tokens (eos included) after their prompts. Examples every
candidate explains equally leave α as it was; examples one candidate explains far better move the
weight to it, even when the description read another expert first. ICM-LoRA's task vector cannot do
this on the demo world: its base model's task vectors identify the task 36-40 % of the time
(benchmarks/RESULTS.md), while the experts' own likelihoods tell them apart.

The examples only choose among the candidates, so a request with examples has its description's
top EXAMPLE_CANDIDATES experts scored (more than the K = 4 a description alone is mixed from):
on the demo world two dev paraphrases have their task 5th or lower. Requests without examples
keep their K. Causal LMs only: an encoder's examples are classification labels, and there this
module is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..adapters import LoraSpec, LoraStack
from ..basemodel import BaseModel
from ..registry import Hit
from .task_vector import Example

EXAMPLE_CANDIDATES = 8


def applies(spec: LoraSpec, example_sets: Sequence[Sequence[Example]]) -> bool:
    """Whether any request has examples to weigh, on a base model this module can score them with."""
    return any(example_sets) and spec.task_type == "CAUSAL_LM"


def candidates(search: Callable[[int], list[list[Hit]]], k: int,
               example_sets: Sequence[Sequence[Example]]) -> list[list[Hit]]:
    """Each row's top EXAMPLE_CANDIDATES hits where it has examples, its top `k` elsewhere (so a row
    without examples reads as it would alone). `search(n)` gives every row's top n."""
    hits = search(max(k, EXAMPLE_CANDIDATES))
    return [row if examples else row[:k] for row, examples in zip(hits, example_sets)]


def reweigh(similarities: Sequence[float], temperature: float, logprobs: Sequence[float] | None) -> list[float]:
    """α = softmax(sim/τ + log p(examples | expert)) over one request's hits, in float64 (no
    examples: softmax(sim/τ))."""
    logits = torch.tensor(list(similarities), dtype=torch.float64) / temperature
    if logprobs:
        logits = logits + torch.tensor(list(logprobs), dtype=torch.float64)
    return torch.softmax(logits, dim=0).tolist()


@torch.no_grad()
def example_logprobs(base: BaseModel, experts: LoraStack, example_sets: Sequence[Sequence[Example]],
                     candidates: Sequence[Sequence[int]]) -> list[list[float] | None]:
    """log p(examples of request i | expert `candidates[i][k]`) for every i and k, all in batched
    forward passes (row r of a pass uses its own expert's LoRA). None for requests without examples."""
    owner = [(i, k) for i, (s, cands) in enumerate(zip(example_sets, candidates)) for k in range(len(cands)) for _ in s]
    flat = [ex for s, cands in zip(example_sets, candidates) for _ in cands for ex in s]
    out: list[list[float] | None] = [[0.0] * len(c) if s else None for s, c in zip(example_sets, candidates)]
    if not flat:
        return out
    rows = [candidates[i][k] for i, k in owner]
    logp, _ = base.output_logprobs([ex["input"] for ex in flat], [ex["output"] for ex in flat],
                                   stack=experts, rows=rows)
    for (i, k), value in zip(owner, logp.tolist()):
        out[i][k] += value  # type: ignore[index]
    return out
