"""Apply many LoRAs to one shared model at once, a different one per batch row.

Forward hooks add `scaling · (x Aᵀ) Bᵀ` to each target module's output, with each row's own A and
B gathered from stacked tensors (Punica's `y += x @ A_i @ B_i`). The shared weights are never
modified, so concurrent callers with different LoRAs cannot interfere, and gradients flow into B
when B requires them (this is how experts are trained, many tasks in one pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import einsum
from torch import nn

from .lora import Lora, resolve_modules
from .spec import LoraSpec, SpecError


@dataclass
class LoraStack:
    """N LoRAs of one spec: A[m] is (N, L, r, in) or shared (L, r, in); B[m] is (N, L, out, r)."""

    spec: LoraSpec
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    # (N,) bool, with a shared A that trains: rows of these LoRAs read A but send it no gradient
    a_frozen: torch.Tensor | None = None

    @classmethod
    def from_loras(cls, loras: Sequence[Lora]) -> LoraStack:
        if not loras:
            raise SpecError("no LoRAs to stack")
        spec = loras[0].spec
        for lora in loras[1:]:
            spec.check_compatible(lora.spec)
            if (lora.spec.rank, lora.spec.scaling) != (spec.rank, spec.scaling):
                raise SpecError("LoRAs applied together need the same rank and scaling")
        A = {m: torch.stack([lo.A[m] for lo in loras]) for m in spec.module_names}
        B = {m: torch.stack([lo.B[m] for lo in loras]) for m in spec.module_names}
        return cls(spec, A, B)

    def __len__(self) -> int:
        return next(iter(self.B.values())).shape[0]


class Rows:
    """Which LoRA each batch row uses; -1 means none. Set it before each forward pass.

    When the rows come in equal consecutive blocks of one LoRA each (how training batches are
    laid out), `blocks` holds each block's LoRA and the hooks use one bmm instead of a gather.
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.blocks: torch.Tensor | None = None

    def set(self, index: torch.Tensor | Sequence[int], block: int | None = None) -> None:
        """`block`: the rows come in consecutive blocks of this size, one LoRA each (adjacent blocks
        may share a LoRA); without it, blocks are runs of one LoRA, used when all are equal."""
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.blocks = None
        if len(self.index) == 0 or bool((self.index < 0).any()):
            return
        if block and len(self.index) % block == 0:
            per_block = self.index.view(-1, block)
            if bool((per_block == per_block[:, :1]).all()):
                self.blocks = per_block[:, 0].clone()
            return
        groups, counts = torch.unique_consecutive(self.index, return_counts=True)
        if bool((counts == counts[0]).all()):
            self.blocks = groups


@contextmanager
def applied(model: nn.Module, stack: LoraStack, rows: Rows | None = None) -> Iterator[Rows]:
    """Within the block, row i of every batch uses LoRA `rows.index[i]` of `stack`."""
    rows = rows or Rows()
    modules = resolve_modules(model, stack.spec)
    handles = []
    for m in stack.spec.modules:
        for layer in range(stack.spec.num_layers):
            module = modules[stack.spec.module_path(layer, m.name)]
            handles.append(module.register_forward_hook(_hook(stack, m.name, layer, rows)))
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def _hook(stack: LoraStack, name: str, layer: int, rows: Rows):  # type: ignore[no-untyped-def]
    scaling = stack.spec.scaling

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if rows.index is None:
            raise RuntimeError("set the LoRA of each row (rows.set([...])) before the forward pass")
        x = inputs[0]
        idx = rows.index.to(x.device)
        if idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"{idx.shape[0]} row indices for a batch of {x.shape[0]}")
        a = stack.A[name]
        if a.ndim == 3 and rows.blocks is not None:  # shared A, equal blocks: one bmm
            groups = rows.blocks.to(x.device)
            xa = _shared_xa(x, a[layer], stack.a_frozen, idx)
            b = _rows_of(stack.B[name], layer, groups).to(output.dtype)  # (groups, out, r)
            flat = xa.reshape(len(groups), -1, xa.shape[-1]).to(output.dtype)
            # output + scaling · delta in one op: fewer full-size temporaries forward and backward
            out = output.reshape(len(groups), -1, output.shape[-1])
            return torch.baddbmm(out, flat, b.transpose(1, 2), alpha=scaling).reshape(output.shape)
        safe = idx.clamp(min=0)
        if a.ndim == 3:
            xa = _shared_xa(x, a[layer], stack.a_frozen, safe)
        else:
            xa = einsum(x, a[safe, layer].to(x.dtype), "b ... i, b r i -> b ... r")
        b = _rows_of(stack.B[name], layer, safe).to(x.dtype)  # (batch, out, r)
        delta = einsum(xa, b, "b ... r, b o r -> b ... o")
        gate = (idx >= 0).to(x.dtype).view(-1, *([1] * (delta.ndim - 1)))
        return output + scaling * gate * delta

    return hook


def _shared_xa(x: torch.Tensor, a: torch.Tensor, frozen: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """x Aᵀ for a shared A (r, in); rows whose LoRA is `frozen` send a trained A no gradient."""
    if frozen is None or not a.requires_grad:
        return einsum(x, a.to(x.dtype), "b ... i, r i -> b ... r")
    keep = (~frozen.to(x.device)[idx]).to(x.dtype)
    return _MaskedProjection.apply(x, a.to(x.dtype), keep)


class _MaskedProjection(torch.autograd.Function):
    """x Aᵀ whose gradient for A counts only the rows `keep` marks (1 or 0 per batch row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, a, keep)
        return einsum(x, a, "b ... i, r i -> b ... r")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, a, keep = ctx.saved_tensors
        grad_x = einsum(grad, a, "b ... r, r i -> b ... i") if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            kept = grad * keep.view(-1, *([1] * (grad.ndim - 1)))
            grad_a = einsum(kept, x, "b ... r, b ... i -> r i")
        return grad_x, grad_a, None


def _rows_of(b: torch.Tensor, layer: int, index: torch.Tensor) -> torch.Tensor:
    """(L, layers, out, r) -> (len(index), out, r): layer `layer` of the LoRAs `index` names.
    `index_select`, not `b[index, layer]`: an index repeats (several blocks or rows of one LoRA), and
    the backward of advanced indexing adds their gradients in a thread-dependent order on a CPU
    (training would not repeat bit for bit), where index_select's backward adds them in order."""
    return b.select(1, layer).index_select(0, index)
