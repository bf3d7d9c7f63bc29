"""A request's examples as evidence for which of its top-K experts the description means.

`weighted`, `icm` and `sg` read a description as α = softmax(sim/τ) over its top-K experts: a
belief about which expert it asks for. When the request brings input/output examples, the base
model can check that belief: each candidate expert's LoRA gives the examples a likelihood. Bayes'
rule with the description's softmax as the prior gives

    α_k ∝ exp(sim_k / τ + log p(examples | expert k)),

log p summed over the examples' output tokens (eos included) after their prompts. Examples every
candidate explains equally leave α as it was; examples one candidate explains far better move the
weight to it, even when the description read another expert first. ICM-LoRA's task vector cannot do
this on the demo world: its base model's task vectors seldom identify the task, while the experts'
own likelihoods tell them apart.

The examples only choose among the candidates, so a request with examples has its description's
top EXAMPLE_CANDIDATES experts scored (more than the K = 4 a description alone is mixed from):
a description can rank its task below the first K. Requests without examples
keep their K. Causal LMs only: an encoder's examples are classification labels, and there this
module is not used.

The same scores tell when no candidate explains the examples: the best candidate's geometric-mean
probability per output token (`examples_fit`) below EXAMPLES_FIT_THRESHOLD flags the request
(`examples_ood`): the registry has no expert for what the examples show, whatever the description
reads like.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import LoraSpec, LoraStack
from ..basemodel import BaseModel
from ..registry import Hit
from .task_vector import Example

EXAMPLE_CANDIDATES = 8
# Between how well a few examples of a task with an expert fit their best candidate and how well
# those of a task without one do; a single example can fit a wrong expert that maps that one word
# the same way, so the flag is reliable from a few examples up.
EXAMPLES_FIT_THRESHOLD = 0.5


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


@dataclass
class Evidence:
    """What a batch's examples say: per row, log p(examples | candidate k) for each of its candidates
    (None for a row without examples), and how many output tokens (eos included) those sum over."""

    logprobs: list[list[float] | None]
    tokens: list[int]

    def fit(self, row: int) -> float | None:
        """exp(mean log p per output token) under the candidate that explains the row's examples best:
        how far its best expert would predict each token. None without examples."""
        values = self.logprobs[row]
        return math.exp(max(values) / max(self.tokens[row], 1)) if values else None

    def ood(self, row: int) -> bool | None:
        """No candidate explains the examples (fit below EXAMPLES_FIT_THRESHOLD); None without examples."""
        fit = self.fit(row)
        return None if fit is None else fit < EXAMPLES_FIT_THRESHOLD


@torch.no_grad()
def example_logprobs(base: BaseModel, experts: LoraStack, example_sets: Sequence[Sequence[Example]],
                     candidates: Sequence[Sequence[int]]) -> Evidence:
    """log p(examples of request i | expert `candidates[i][k]`) for every i and k, all in batched
    forward passes (row r of a pass uses its own expert's LoRA)."""
    owner = [(i, k) for i, (s, cands) in enumerate(zip(example_sets, candidates)) for k in range(len(cands)) for _ in s]
    flat = [ex for s, cands in zip(example_sets, candidates) for _ in cands for ex in s]
    out: list[list[float] | None] = [[0.0] * len(c) if s else None for s, c in zip(example_sets, candidates)]
    tokens = [0] * len(example_sets)
    if not flat:
        return Evidence(out, tokens)
    rows = [candidates[i][k] for i, k in owner]
    logp, count = base.output_logprobs([ex["input"] for ex in flat], [ex["output"] for ex in flat],
                                       stack=experts, rows=rows)
    for (i, k), value, n in zip(owner, logp.tolist(), count.tolist()):
        out[i][k] += value  # type: ignore[index]
        if k == 0:  # every candidate scores the same tokens
            tokens[i] += int(n)
    return Evidence(out, tokens)


def examples_metadata(used: bool, from_description: bool, evidence: Evidence | None, row: int) -> dict[str, Any]:
    """The metadata keys a generated LoRA carries about its request's examples."""
    scored = used and evidence is not None and evidence.logprobs[row] is not None
    return {"examples_used": used, "examples_from_description": used and from_description,
            "examples_fit": evidence.fit(row) if scored else None,  # type: ignore[union-attr]
            "examples_ood": evidence.ood(row) if scored else None}  # type: ignore[union-attr]
