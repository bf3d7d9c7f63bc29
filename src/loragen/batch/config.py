"""`BatchConfig`: what `run_batch` generates, where, and whether it evaluates; read by the run and by
its evaluation alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BatchConfig:
    input: Path
    out: Path
    registry: Path
    methods: list[str] = field(default_factory=lambda: ["weighted"])
    generators: dict[str, Path] = field(default_factory=dict)  # method -> checkpoint dir
    device: str = "cpu"
    batch_size: int = 256  # items per chunk
    seed: int = 0
    k: int = 4
    temperature: float = 0.05
    train_fraction: float = 0.7  # task-file lines are evaluated on the rest of their instances
    evaluate: bool = False
    max_eval_instances: int | None = None  # per item, the first N of its instances (None: all)
