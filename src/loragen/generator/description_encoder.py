"""The registry's text encoder with its top layers fine-tuned on the registry's own paraphrases.

A linear head over frozen MiniLM embeddings (`description_head.py`) can only bend the pooled space.
Fine-tuning the last transformer layers with the same supervised contrastive loss (descriptions of
one expert are positives) lets the encoder re-read the words. Alone it learns the registry's wording
as well as its meaning: paraphrases worded like the registry's are read better than through the
head alone, but paraphrases worded differently are read worse. A linear head fitted on top of the
tuned embeddings (the default) keeps the first gain without the loss.

The layers below the tuned ones are frozen, so their output is computed once and every epoch runs
only the top layers. A checkpoint stores the tuned layers' weights alone; loading applies them to a
copy of the registry's encoder. Needs a BERT encoder with mean pooling (MiniLM); other encoders get
the head alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..embeddings import TextEncoder
from ..embeddings.packed import PackedBert
from .description_head import contrastive_loss

PREFIX = "description_encoder."


@dataclass
class TuningConfig:
    """Chosen on the demo world's dev paraphrases (top-1 expert): one tuned layer reads them worse
    than two, and three or six layers, or more epochs, no better."""

    layers: int = 2
    epochs: int = 8
    lr: float = 5e-5
    temperature: float = 0.1
    batch: int = 64
    weight_decay: float = 0.01


def tunable(encoder: TextEncoder) -> bool:
    return PackedBert.supports(encoder.transformer)


def fine_tune(encoder: TextEncoder, texts: list[str], owners: np.ndarray, config: TuningConfig | None = None, *,
              seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor] | None:
    """The tuned top layers' weights (names as in the encoder's `state_dict`), or None when the
    encoder is not tunable or fewer than two experts have two descriptions (nothing to learn from).
    The encoder itself is left as it was."""
    config = config or TuningConfig()
    labels = torch.unique(torch.as_tensor(np.asarray(owners)), return_inverse=True)[1]
    if not tunable(encoder) or int((torch.bincount(labels) >= 2).sum()) < 2:
        return None
    model = copy.deepcopy(encoder.transformer).to("cpu", torch.float32)
    bert = model[0].auto_model
    first = len(bert.encoder.layer) - config.layers
    top = bert.encoder.layer[first:]
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` is deprecated since 5.x
    features = tokenize(list(texts))
    mask = features["attention_mask"]
    lengths = mask.sum(1)
    additive = ((1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min)
    hidden = frozen_states(bert, features, first)
    bert.requires_grad_(False)
    top.requires_grad_(True).train()
    opt = torch.optim.AdamW(top.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # dropout draws from the global generator
        torch.manual_seed(seed)
        for _ in tqdm(range(config.epochs), desc="description encoder", unit="epoch", disable=not progress):
            for rows in length_batches(lengths, config.batch, gen):
                width = int(lengths[rows].max())
                h = hidden[rows, :width]
                for layer in top:
                    h = layer(h, additive[rows, ..., :width])
                m = mask[rows, :width, None].float()
                pooled = F.normalize((h * m).sum(1) / m.sum(1), dim=1)
                loss = contrastive_loss(pooled, labels[rows], config.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {f"encoder.layer.{first + i}.{name}": p.detach().clone().contiguous()
            for i, layer in enumerate(top) for name, p in layer.named_parameters()}


@torch.no_grad()
def frozen_states(bert: torch.nn.Module, features: dict[str, torch.Tensor], layers: int,
                  batch: int = 256) -> torch.Tensor:
    """(texts, width, hidden): the output of the first `layers` layers, in batches of texts of
    similar length, each run at its own longest text's width. Positions past a text's end hold
    whatever its batch gave them (zeros past the batch's width): the attention mask hides them."""
    bert.eval()
    ids, mask = features["input_ids"], features["attention_mask"]
    types = features.get("token_type_ids")
    lengths = mask.sum(1)
    hidden = torch.zeros(*ids.shape, bert.config.hidden_size)
    for rows in torch.argsort(lengths, stable=True).split(batch):
        width = int(lengths[rows].max())
        additive = (1.0 - mask[rows, None, None, :width].float()) * torch.finfo(torch.float32).min
        h = bert.embeddings(input_ids=ids[rows, :width], token_type_ids=None if types is None else types[rows, :width])
        for layer in bert.encoder.layer[:layers]:
            h = layer(h, additive)
        hidden[rows, :width] = h
    return hidden


def length_batches(lengths: torch.Tensor, batch: int, gen: torch.Generator, pool: int = 8) -> list[torch.Tensor]:
    """Random batches of texts of similar length, so that each runs at its own longest text's width
    rather than the whole set's (half the compute on the demo registry). Texts are shuffled, cut into
    pools of `pool` batches, sorted by length within a pool, and the batches shuffled again."""
    order = torch.randperm(len(lengths), generator=gen)
    batches = []
    for chunk in order.split(batch * pool):
        batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


class DescriptionEncoder:
    """`encode(texts)` -> unit rows in the tuned space: the registry's encoder with `weights` applied."""

    def __init__(self, base: TextEncoder, weights: dict[str, torch.Tensor], config: TuningConfig) -> None:
        self.weights, self.config = weights, config
        self.encoder = base.with_weights(weights)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.weights.items()}

    @classmethod
    def from_state_dict(cls, base: TextEncoder, tensors: dict[str, torch.Tensor],
                        config: TuningConfig | None) -> DescriptionEncoder | None:
        weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        return cls(base, weights, config or TuningConfig()) if weights else None
