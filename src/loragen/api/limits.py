"""Per-request cost limits, checked before any work: a request over one is refused at once.

What the schema can say, it says (lengths, counts, `k`, `max_tokens`). The rest depends on the
settings or on the loaded base model, and is checked here:

- the total characters of a request's examples (`max_example_chars`) and their total tokens
  (`max_example_tokens`), each example also within the base model's context;
- a completion's prompt tokens plus `max_tokens` within the base model's context;
- a batch's total description characters, batch size x description length (`max_batch_chars`);
- the LoRA bytes one request generates, samples or batch items x adapter size (`max_generated_bytes`);
- the memory guard: the estimated working set (examples x candidates x tokens x layers; batch x
  adapter bytes) within `memory_budget_bytes`.

Each refusal names the setting and the request's own figure, so the message says what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapters import LoraSpec
from ..errors import LimitExceeded, OverBudget
from ..generator.example_evidence import EXAMPLE_CANDIDATES
from .settings import ApiSettings

FLOAT_BYTES = 4
# The examples' log-probabilities are computed in forward passes of at most this many rows
# (`BaseModel.output_logprobs`' batch size).
SCORING_ROWS = 256
# Copies of a generated LoRA alive at once: the generator's output, the cache's, the response body.
LORA_COPIES = 3


def lora_bytes(spec: LoraSpec) -> int:
    """The bytes of one LoRA's float32 A and B over every layer."""
    per_layer = sum((m.in_features + m.out_features) * spec.rank for m in spec.modules)
    return per_layer * spec.num_layers * FLOAT_BYTES


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The base model's context in tokens (its position embeddings), if it says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


@dataclass
class Limits:
    """The limits of `settings` for a registry of `spec`; `base` is the loaded base model, if any
    (token counts and the context need its tokenizer and config; without it characters stand in)."""

    settings: ApiSettings
    spec: LoraSpec
    base: Any = None
    _tokenizer: Any = field(default=None, init=False, repr=False)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids from a copy of the base model's tokenizer: a fast tokenizer is not safe to share
        with the thread that is completing with it."""
        if self._tokenizer is None:
            self._tokenizer = copy.deepcopy(self.base.tokenizer)
        return list(self._tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _over(self, what: str, got: int, limit: int, setting: str) -> None:
        if got > limit:
            raise LimitExceeded(f"{what} is {got}, over the limit of {limit} ({setting})", setting)

    # ------------------------------------------------------------ generation
    def generation(self, samples: int, examples: Sequence[tuple[str, str]] | None = None) -> int:
        """Checks one generation request; returns the LoRA bytes it will generate."""
        generated = samples * lora_bytes(self.spec)
        self._over("the LoRA bytes this request generates (num_samples x adapter size)", generated,
                   self.settings.max_generated_bytes, "max_generated_bytes")
        self._over_budget("num_samples x adapter bytes", generated * LORA_COPIES)
        if examples:
            self.examples(examples)
        return generated

    def examples(self, examples: Sequence[tuple[str, str]]) -> None:
        chars = sum(len(x) + len(y) for x, y in examples)
        self._over("the total characters of the examples (inputs and outputs)", chars,
                   self.settings.max_example_chars, "max_example_chars")
        lengths = self._example_tokens(examples)
        context = self._context()
        if context is not None:
            for i, n in enumerate(lengths):
                if n > context:
                    raise LimitExceeded(f"examples[{i}] is {n} tokens (prompt, output and end of text), over the "
                                        f"base model's context of {context}", "context")
        self._over("the total tokens of the examples", sum(lengths), self.settings.max_example_tokens,
                   "max_example_tokens")
        rows = min(len(examples) * EXAMPLE_CANDIDATES, SCORING_ROWS)
        self._over_budget(f"scoring {len(examples)} examples against {EXAMPLE_CANDIDATES} candidate experts",
                          self._forward_bytes(rows, max(lengths, default=0)))

    def batch(self, descriptions: Sequence[str]) -> int:
        """Checks a batch; returns the LoRA bytes it will generate."""
        chars = sum(len(d) for d in descriptions)
        self._over("the total characters of the batch's descriptions (batch size x description length)", chars,
                   self.settings.max_batch_chars, "max_batch_chars")
        generated = len(descriptions) * lora_bytes(self.spec)
        self._over("the LoRA bytes this batch generates (descriptions x adapter size)", generated,
                   self.settings.max_generated_bytes, "max_generated_bytes")
        self._over_budget("batch size x adapter bytes", generated * LORA_COPIES)
        return generated

    # ------------------------------------------------------------ completions
    def completion(self, prompt: str, max_tokens: int, raw: bool = False) -> None:
        """`raw`: the prompt is sent as it is; else it is a chat's text, which the chat template wraps."""
        context = self._context()
        if context is None or self.base is None:
            return
        tokens = len(self.tokenize([prompt if raw else self.base.prompt(prompt)])[0])
        if tokens + max_tokens > context:
            raise LimitExceeded(f"the prompt is {tokens} tokens and max_tokens is {max_tokens}: {tokens + max_tokens}, "
                                f"over the base model's context of {context}", "context")
        self._over_budget("the completion's forward pass", self._forward_bytes(1, tokens + max_tokens))

    # ------------------------------------------------------------ estimates
    def _context(self) -> int | None:
        if self.base is None:
            return None
        return context_length(self.base.model.config, self.base.tokenizer)

    def _example_tokens(self, examples: Sequence[tuple[str, str]]) -> list[int]:
        """Each example's prompt + output + eos tokens (characters where no tokenizer is loaded)."""
        if self.base is None:
            return [len(x) + len(y) + 1 for x, y in examples]
        prompts = self.tokenize([self.base.prompt(x) for x, _ in examples])
        outputs = self.tokenize([y for _, y in examples])
        return [len(p) + len(o) + 1 for p, o in zip(prompts, outputs)]

    def _forward_bytes(self, rows: int, width: int) -> int:
        """A forward pass of `rows` x `width` tokens: the logits and their log-softmax, each layer's
        activations, and one layer's attention scores."""
        config = getattr(getattr(self.base, "model", None), "config", None)
        if config is None:
            return 0
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
        layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
        per_token = 2 * vocab + hidden * (layers + 4)
        return rows * width * (per_token + heads * width) * FLOAT_BYTES

    def _over_budget(self, what: str, estimate: int) -> None:
        budget = self.settings.memory_budget_bytes
        if estimate > budget:
            raise OverBudget(f"{what} would need about {estimate / 2**20:.0f} MiB of working memory, over the budget "
                             f"of {budget / 2**20:.0f} MiB (memory_budget_bytes)", "memory_budget_bytes")
