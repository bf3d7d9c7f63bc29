"""Description controls: the real description swapped for unrelated text, or for another task's.

A generator that ignores its condition scores as well with these as with the real description;
one that reads it should score clearly worse. The unrelated texts are about nothing a string or
classification task would ask for; the mismatched one is a real task description of another
family, so it measures what the generator gains from reading *its own* task's description.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

UNRELATED_TEXTS = (
    "describe how glaciers carve valleys over thousands of years",
    "give the opening hours of the municipal swimming pool",
    "list the ingredients needed for a loaf of rye bread",
    "explain how a lighthouse lens focuses its beam",
    "recount the history of the printing press in europe",
    "suggest a route for a three day hike in the alps",
    "what time does the last ferry leave the harbour",
    "compare the orbits of jupiter's four largest moons",
)


def unrelated_description(key: str, seed: int = 0) -> str:
    """A fixed unrelated text per (key, seed), the same on every run."""
    return random.Random(f"{seed}:{key}").choice(UNRELATED_TEXTS)


def mismatched_index(names: Sequence[str], families: Sequence[str | None], i: int, seed: int = 0) -> int:
    """Another task for task `i`: one of another family where there is one, else any other; fixed
    per (name, seed)."""
    others = [j for j in range(len(names)) if j != i]
    if not others:
        raise ValueError("a mismatched description needs at least two tasks")
    apart = [j for j in others if families[j] is None or families[j] != families[i]]
    return random.Random(f"{seed}:mismatched:{names[i]}").choice(apart or others)
