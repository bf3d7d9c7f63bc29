"""The fused token decoder (DESIGN §5): every (layer, module) B of every request in one pass.

A LoRA is L × M tokens, token t = (layer l, module m), holding B (out × r) of that module. Module
types with the same (out, r) form one *group* with its own output head; inside a group tokens are
ordered layer-major, so a group's output reshapes straight into (N, L, out, r) per module.

The trunk's first layer is linear over [z | condition | layer emb | type emb | token features];
it is computed as a sum of per-request and per-token projections broadcast over (N, T), so the
concatenation is never materialised. Then one GEMM per trunk layer over all N·T tokens and one GEMM
per head group. Nothing loops over layers or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..adapters import LoraSpec


@dataclass(frozen=True)
class Group:
    """Module types that share one B shape, hence one output head."""

    modules: tuple[str, ...]
    out: int
    rank: int
    tokens: tuple[int, ...]  # global token indices (l * M + m), layer-major

    @property
    def width(self) -> int:
        return self.out * self.rank


class TokenLayout:
    """Token indices, groups, and the conversions between per-module Bs and group tensors."""

    def __init__(self, spec: LoraSpec) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self.num_types = len(spec.modules)
        by_shape: dict[int, list[int]] = {}
        for i, m in enumerate(spec.modules):
            by_shape.setdefault(m.out_features, []).append(i)
        self.groups: list[Group] = []
        for out, idx in by_shape.items():
            tokens = tuple(l * self.num_types + i for l in range(self.num_layers) for i in idx)
            names = tuple(spec.modules[i].name for i in idx)
            self.groups.append(Group(names, out, spec.rank, tokens))

    @property
    def num_tokens(self) -> int:
        return self.num_layers * self.num_types

    def layer_ids(self) -> torch.Tensor:
        return torch.arange(self.num_tokens) // self.num_types

    def type_ids(self) -> torch.Tensor:
        return torch.arange(self.num_tokens) % self.num_types

    def to_groups(self, B: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-module (N, L, out, r) -> per-group (N, L·J, out·r)."""
        out = []
        for g in self.groups:
            stacked = torch.stack([B[m] for m in g.modules], dim=2)
            out.append(rearrange(stacked, "n l j o r -> n (l j) (o r)"))
        return out

    def to_modules(self, groups: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-group (N, L·J, out·r) -> per-module (N, L, out, r) views, no copies."""
        B: dict[str, torch.Tensor] = {}
        for g, x in zip(self.groups, groups):
            x = rearrange(x, "n (l j) (o r) -> n l j o r", l=self.num_layers, o=g.out)
            for j, m in enumerate(g.modules):
                B[m] = x[:, :, j]
        return B


class GroupProjection(nn.Module):
    """A per-group linear map of token contents (width out·r) to `dim`, one GEMM per group."""

    def __init__(self, layout: TokenLayout, dim: int) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim
        self.proj = nn.ModuleList(nn.Linear(g.width, dim) for g in layout.groups)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        """(N, T_g, width_g) per group -> (N, T, dim) in global token order."""
        n = groups[0].shape[0]
        ref = self.proj[0].weight
        out = torch.empty(n, self.layout.num_tokens, self.dim, device=ref.device, dtype=ref.dtype)
        for g, x, proj in zip(self.layout.groups, groups, self.proj):
            out[:, list(g.tokens)] = proj(x)
        return out


class TokenDecoder(nn.Module):
    """Shared trunk + one head per group: (request vector, token features) -> token contents."""

    def __init__(self, layout: TokenLayout, request_dim: int, *, hidden: int = 256, embed: int = 32,
                 token_dim: int = 0, depth: int = 2) -> None:
        super().__init__()
        self.layout = layout
        self.layer_emb = nn.Embedding(layout.num_layers, embed)
        self.type_emb = nn.Embedding(layout.num_types, embed)
        self.request_in = nn.Linear(request_dim, hidden)
        self.position_in = nn.Linear(2 * embed, hidden, bias=False)
        self.token_in = nn.Linear(token_dim, hidden, bias=False) if token_dim else None
        self.trunk = nn.Sequential(*[m for _ in range(depth - 1) for m in (nn.GELU(), nn.Linear(hidden, hidden))],
                                   nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(hidden, g.width) for g in layout.groups)
        self.register_buffer("layer_ids", layout.layer_ids(), persistent=False)
        self.register_buffer("type_ids", layout.type_ids(), persistent=False)
        self.register_buffer("group_tokens", torch.tensor([t for g in layout.groups for t in g.tokens]),
                             persistent=False)

    def features(self, request: torch.Tensor, token_features: torch.Tensor | None = None) -> torch.Tensor:
        """request (N, request_dim), token_features (N, T, token_dim) -> trunk output (N, T, hidden),
        tokens reordered group by group so that each head reads one contiguous run."""
        pos = torch.cat([self.layer_emb(self.layer_ids), self.type_emb(self.type_ids)], dim=-1)
        h = rearrange(self.request_in(request), "n h -> n 1 h") + self.position_in(pos)
        if self.token_in is not None:
            assert token_features is not None, "this decoder was built with per-token features"
            h = h + self.token_in(token_features)
        return self.trunk(h)[:, self.group_tokens]

    def _runs(self, h: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for g in self.layout.groups:
            out.append(h[:, start : start + len(g.tokens)])
            start += len(g.tokens)
        return out

    def forward(self, request: torch.Tensor, token_features: torch.Tensor | None = None) -> list[torch.Tensor]:
        """-> per group (N, T_g, out·r), normalised token contents."""
        return [head(x) for head, x in zip(self.heads, self._runs(self.features(request, token_features)))]

    def folded_heads(self) -> list[torch.Tensor]:
        """Per group [W | b | 1 | 0…] (width, hidden + pad): with inputs [s·h | s | m | 0…] one GEMM gives
        s·(W h + b) + m, the denormalised token, in the output dtype with no separate epilogue pass.
        Padded to a multiple of 8 columns for tensor-core GEMMs."""
        folded = []
        for head in self.heads:
            w, b = head.weight.detach(), head.bias.detach()
            pad = -(w.shape[1] + 2) % 8
            extra = torch.zeros(w.shape[0], 2 + pad, device=w.device, dtype=w.dtype)
            extra[:, 0], extra[:, 1] = b, 1
            folded.append(torch.cat([w, extra], dim=1).contiguous())
        return folded

    def denormalised(self, request: torch.Tensor, folded: list[torch.Tensor], mean: list[torch.Tensor],
                     std: list[torch.Tensor]) -> list[torch.Tensor]:
        """Like `forward`, with each token's normalisation (per-token mean and std, (T_g,) each)
        undone inside the head GEMM; `folded` from `folded_heads()`."""
        out = []
        for x, w, m, s in zip(self._runs(self.features(request)), folded, mean, std):
            n, t, _ = x.shape
            pad = w.shape[1] - x.shape[-1] - 2
            scale, shift = s.to(x)[:, None].expand(n, t, 1), m.to(x)[:, None].expand(n, t, 1)
            aug = torch.cat([x * scale, scale, shift, x.new_zeros(n, t, pad)], dim=-1)
            out.append(aug @ w.T)
        return out
