"""The fused decode under torch.compile, replayed as CUDA graphs on a GPU (opt-in: `compile_decoder`).

On a GPU the decode of a few requests is launch-bound, which CUDA graphs remove; large batches are
GEMM-bound and gain little. On a CPU inductor leaves the decode (GEMMs and their weight traffic)
about as it was. A request's time end to end is mostly text encoding, so this is off by default.

A graph is recorded per input shape. Batches are padded to the next power of two (as vLLM pads to
its capture sizes), so a server records at most log2(max batch) + 1 of them; the service compiles
them all while it warms up (one sample per request; other `num_samples` compile on first use).
Outputs are copied out, since the next replay writes into the same buffers. If compilation fails
(no C++ compiler for inductor, say) the decode stays eager and says so once in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

Decode = Callable[[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None, torch.Tensor],
                  dict[str, torch.Tensor]]


def bucket(n: int) -> int:
    """The padded batch size for `n` requests: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class CompiledDecode:
    def __init__(self, decode: Decode, device: torch.device) -> None:
        self.eager = decode
        # On CUDA, "reduce-overhead" records CUDA graph trees, whose state is thread-local and set up
        # on the main thread only; elsewhere (a server's engine thread) plain CUDA graphs are recorded.
        # With torch 2.11 those work for icm's decode but assert inside inductor for sg's, which then
        # decodes eagerly.
        self.trees = device.type == "cuda" and threading.current_thread() is threading.main_thread()
        how: dict[str, Any] = {}
        if self.trees:
            how = {"mode": "reduce-overhead"}
        elif device.type == "cuda":
            how = {"options": {"triton.cudagraphs": True, "triton.cudagraph_trees": False}}
        self.compiled: Decode | None = torch.compile(decode, dynamic=False, **how)

    def __call__(self, text: torch.Tensor, mu: list[torch.Tensor] | None, sigma: list[torch.Tensor] | None,
                 noise: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled is None:
            return self.eager(text, mu, sigma, noise)
        n, size = text.shape[0], bucket(text.shape[0])

        def pad(x: torch.Tensor) -> torch.Tensor:  # copies of row 0: real conditions, finite outputs
            return torch.cat([x, x[:1].expand(size - n, *x.shape[1:])]) if size > n else x

        padded = (pad(text), [pad(m) for m in mu] if mu is not None else None,
                  [pad(s) for s in sigma] if sigma is not None else None, noise.to(text.device))
        try:
            if self.trees:  # earlier outputs were copied out: the graphs may reuse their memory
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(*padded)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: serve eagerly rather than fail requests
            log.warning("torch.compile of the decoder failed, decoding eagerly from now on: %r", exc, exc_info=True)
            self.compiled = None
            return self.eager(text, mu, sigma, noise)
        rows = n * noise.shape[0]  # (requests × samples) rows, requests first
        return {m: b[:rows].clone() for m, b in out.items()}
