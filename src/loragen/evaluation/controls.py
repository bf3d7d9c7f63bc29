"""Description controls: the real description swapped for unrelated text, or for another task's.

A generator that ignores its condition scores as well with these as with the real description;
one that reads it should score clearly worse. The unrelated texts are about nothing a string or
classification task would ask for; the mismatched one is a real task description of another
family, so it measures what the generator gains from reading *its own* task's description.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from importlib import resources



@functools.cache
def unrelated_texts() -> tuple[str, ...]:
    """The unrelated texts (package data `evaluation/data/unrelated.jsonl`), in file order."""
    lines = resources.files(__package__).joinpath("data/unrelated.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line)["text"] for line in lines if line.strip())


def unrelated_description(key: str, seed: int = 0) -> str:
    """A fixed unrelated text per (key, seed), the same on every run."""
    return random.Random(f"{seed}:{key}").choice(unrelated_texts())


def mismatched_index(names: Sequence[str], families: Sequence[str | None], i: int, seed: int = 0) -> int:
    """Another task for task `i`: one of another family where there is one, else any other; fixed
    per (name, seed)."""
    others = [j for j in range(len(names)) if j != i]
    if not others:
        raise ValueError("a mismatched description needs at least two tasks")
    apart = [j for j in others if families[j] is None or families[j] != families[i]]
    return random.Random(f"{seed}:mismatched:{names[i]}").choice(apart or others)
