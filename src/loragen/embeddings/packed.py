"""A padding-free forward for sentence-transformers BERT encoders with mean pooling (MiniLM).

sentence-transformers pads every text of a batch to the longest one, and under bf16 autocast casts
every weight again on each call. For short descriptions (~13 tokens, longest ~17) that is a fifth
of the matrix work spent on padding and a tenth of the time on casts. Here the tokens of all texts
are packed into one (tokens, hidden) matrix: every linear layer runs on real tokens only, with
weights cast once (query, key and value fused into one matrix); only attention, which must see
one text at a time, scatters them into a padded (texts, heads, length, head_dim) layout.

float32 gives the library's embeddings to ~1e-7; bfloat16 runs the matrix products in bf16 and
keeps the residual stream, layer norms, softmax and pooling in float32 (as autocast does).
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _linear(dtype: torch.dtype, *linears: torch.nn.Linear) -> list[torch.Tensor]:
    """Weight and bias of `linears` stacked (q, k, v), in `dtype`: a copy only where that takes one."""
    weights, biases = [m.weight.detach() for m in linears], [m.bias.detach() for m in linears]
    if len(linears) > 1:
        weights, biases = [torch.cat(weights)], [torch.cat(biases)]
    return [weights[0].to(dtype).contiguous(), biases[0].to(dtype)]


def _norm(layer_norm: torch.nn.LayerNorm) -> list[torch.Tensor]:
    return [layer_norm.weight.detach().float(), layer_norm.bias.detach().float()]


def _scripted(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """TorchScript, because a scripted call runs without the GIL: in the server the event loop's
    Python would otherwise stall the encoder between every two of its ops (a busy Python thread
    slows the eager version several-fold). torch marks `jit.script` deprecated but has no GIL-free
    replacement that needs no compiler; where it is gone, the same function runs eagerly."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)  # type: ignore[no-any-return]
    except Exception:  # pragma: no cover - a torch without TorchScript
        return fn


# Scripted code cannot use einops, so shapes are in the comments.
@_scripted
def _forward(ids: torch.Tensor, lengths: torch.Tensor, embeddings: list[torch.Tensor],
             layers: list[list[torch.Tensor]], heads: int, eps: float) -> torch.Tensor:
    word, position, token_type, norm_w, norm_b = embeddings
    n, hidden = lengths.size(0), word.size(1)
    longest = int(lengths.max())
    text_of = torch.repeat_interleave(torch.arange(n), lengths)  # per packed token
    pos = torch.arange(text_of.size(0)) - (torch.cumsum(lengths, 0) - lengths)[text_of]
    slot = text_of * longest + pos  # its row in the padded (n * longest) layout
    padding = (torch.arange(longest).unsqueeze(0) >= lengths.unsqueeze(1)).view(n, 1, 1, longest)
    bias = torch.zeros(n, 1, 1, longest).masked_fill(padding, float("-inf"))  # keys past a text's end
    x = F.embedding(ids, word) + F.embedding(pos, position) + token_type
    x = F.layer_norm(x, [hidden], norm_w, norm_b, eps)  # (tokens, hidden), float32
    for w in layers:
        dtype = w[0].dtype
        qkv = F.linear(x.to(dtype), w[0], w[1])  # (tokens, 3 * hidden)
        padded = torch.zeros(n * longest, 3 * hidden, dtype=dtype).index_copy(0, slot, qkv)
        qkv = padded.view(n, longest, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)  # (3, n, h, l, d)
        # Explicit attention: for blocks this small torch's CPU flash kernel is slower in bf16.
        scores = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)).float() * (hidden // heads) ** -0.5 + bias
        attended = torch.matmul(scores.softmax(-1).to(dtype), qkv[2])  # (n, h, l, d)
        attended = attended.permute(0, 2, 1, 3).reshape(n * longest, hidden).index_select(0, slot)
        x = F.layer_norm(F.linear(attended, w[2], w[3]).float() + x, [hidden], w[4], w[5], eps)
        up = F.gelu(F.linear(x.to(dtype), w[6], w[7]))
        x = F.layer_norm(F.linear(up, w[8], w[9]).float() + x, [hidden], w[10], w[11], eps)
    return torch.zeros(n, hidden).index_add(0, text_of, x) / lengths.unsqueeze(1)  # mean over tokens


class PackedBert:
    """`encode(texts)` -> (n, hidden) float32 mean-pooled embeddings (not normalised), on CPU."""

    def __init__(self, model: Any, dtype: torch.dtype = torch.float32) -> None:
        transformer = model[0]
        bert = transformer.auto_model
        self.tokenizer = transformer.tokenizer
        self.max_length = int(transformer.max_seq_length)
        self.heads = int(bert.config.num_attention_heads)
        self.eps = float(bert.config.layer_norm_eps)
        emb = bert.embeddings
        self.embeddings = [emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach(),
                           emb.token_type_embeddings.weight.detach()[0], *_norm(emb.LayerNorm)]
        self.layers = []
        for layer in bert.encoder.layer:
            attn = layer.attention
            self.layers.append([*_linear(dtype, attn.self.query, attn.self.key, attn.self.value),
                                *_linear(dtype, attn.output.dense), *_norm(attn.output.LayerNorm),
                                *_linear(dtype, layer.intermediate.dense), *_linear(dtype, layer.output.dense),
                                *_norm(layer.output.LayerNorm)])
        # A fast tokenizer's Rust object is not safe to call from two threads at once.
        self._tokenizing = threading.Lock()

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is a BERT encoder with mean pooling and nothing this forward leaves out."""
        from transformers import BertModel

        modules = list(model)
        if len(modules) not in (2, 3) or type(modules[0]).__name__ != "Transformer":
            return False
        bert, pooling = getattr(modules[0], "auto_model", None), modules[1]
        if not isinstance(bert, BertModel) or type(pooling).__name__ != "Pooling":
            return False
        if len(modules) == 3 and type(modules[2]).__name__ != "Normalize":
            return False
        config = bert.config
        return (getattr(pooling, "pooling_mode", None) == "mean" and getattr(pooling, "include_prompt", True)
                and getattr(config, "position_embedding_type", "absolute") == "absolute"
                and config.hidden_act == "gelu" and not getattr(modules[0], "do_lower_case", False)
                and not config.is_decoder)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        with self._tokenizing:
            ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        lengths = torch.tensor([len(x) for x in ids])
        flat = torch.tensor(list(itertools.chain.from_iterable(ids)))
        return _forward(flat, lengths, self.embeddings, self.layers, self.heads, self.eps).numpy()
