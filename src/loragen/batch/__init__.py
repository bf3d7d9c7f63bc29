"""Offline batch generation: many descriptions in, one PEFT adapter per (item, method) out.

`run_batch` drives it (resumable, via `manifest.jsonl`); `generate_chunk` is the pure step over a
chunk of jobs, the unit a distributed runner (Ray Data) would map over.
"""

from .items import MAX_DESCRIPTION_CHARS, BatchItem, ItemError, read_items
from .manifest import Manifest
from .config import BatchConfig
from .run import BatchSummary, run_batch
from .step import Job, Outcome, adapter_path, generate_chunk, write_outcome

__all__ = ["MAX_DESCRIPTION_CHARS", "BatchConfig", "BatchItem", "BatchSummary", "ItemError", "Job", "Manifest",
           "Outcome", "adapter_path", "generate_chunk", "read_items", "run_batch", "write_outcome"]
