"""The label-scoring classifier of cls-tasks (DESIGN §6): no task head.

The input and every label string are encoded by the same (LoRA-adapted) encoder, mean-pooled and
L2-normalised as all-MiniLM-L6-v2's sentence-transformers pipeline does, and the predicted label
is the one with the highest cosine similarity. LoRAs are applied per row with `adapters.applied`,
so one forward pass serves many tasks' experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import Lora, LoraStack, Rows, applied
from .embeddings import default_model_path
from .errors import LoragenError


@dataclass
class EncoderModel:
    model: nn.Module
    tokenizer: Any
    path: str
    max_length: int = 128

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "cpu") -> EncoderModel:
        """A local encoder directory; default: the packaged all-MiniLM-L6-v2."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else default_model_path()
        if not (path / "config.json").is_file():
            raise LoragenError(f"no encoder model at {path} (a local Hugging Face directory)")
        # float32 whatever the file holds: experts are trained on it.
        model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        return cls(model, AutoTokenizer.from_pretrained(path), str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings under whatever LoRA rows are set."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


    def embed_rows(self, texts: Sequence[str], rows: Rows, index: Sequence[int], chunk: int = 64) -> torch.Tensor:
        """`embed` with row i under LoRA `index[i]` of the applied stack, in input order. Texts go
        through in chunks of similar length, so short inputs are not padded to the longest one
        in the batch (most are far shorter than the encoder's limit)."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        parts = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            rows.set([index[i] for i in part])
            parts.append(self.embed([texts[i] for i in part]))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(parts)[inverse.to(parts[0].device)]


def score(input_vecs: torch.Tensor, label_vecs: torch.Tensor, offsets: list[tuple[int, int]],
          group_of_input: Sequence[int]) -> list[torch.Tensor]:
    """Per input: cosine similarities to its group's labels."""
    return [input_vecs[i] @ label_vecs[offsets[g][0]:offsets[g][1]].T for i, g in enumerate(group_of_input)]


@torch.no_grad()
def accuracy(encoder: EncoderModel, loras: Sequence[Lora | None], labels: Sequence[Sequence[str]],
             instances: Sequence[Sequence[Any]], *, batch_size: int = 128) -> list[float]:
    """Per group i: accuracy of label scoring on `instances[i]` under `loras[i]` (None: base)."""
    present = [lo.to(device=encoder.device) for lo in loras if lo is not None]
    stack = LoraStack.from_loras(present) if present else None
    slot, n = [], 0
    for lo in loras:
        slot.append(-1 if lo is None else n)
        n += lo is not None
    pairs = [(g, inst) for g, group in enumerate(instances) for inst in group]
    # batches of similar length pad less; each pair's outcome does not depend on its batch
    lengths = [len(ids) for ids in encoder.tokenizer([inst.input for _, inst in pairs], truncation=True,
                                                     max_length=encoder.max_length)["input_ids"]]
    pairs = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: lengths[i])]
    hits = [0] * len(loras)
    rows = Rows()
    ctx = applied(encoder.model, stack, rows) if stack is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        rows.set([slot[g] for g in range(len(loras)) for _ in labels[g]])
        label_vecs = encoder.embed([lab for group in labels for lab in group])
        offsets, start = [], 0
        for group in labels:
            offsets.append((start, start + len(group)))
            start += len(group)
        batches = range(0, len(pairs), batch_size)
        for b in tqdm(batches, desc="label scoring", unit="batch", leave=False, disable=len(batches) < 8):
            chunk = pairs[b:b + batch_size]
            rows.set([slot[g] for g, _ in chunk])
            vecs = encoder.embed([inst.input for _, inst in chunk])
            for (g, inst), sims in zip(chunk, score(vecs, label_vecs, offsets, [g for g, _ in chunk])):
                hits[g] += labels[g][int(sims.argmax())] == inst.output
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return [h / max(1, len(group)) for h, group in zip(hits, instances)]
