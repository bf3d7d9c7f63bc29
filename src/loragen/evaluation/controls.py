"""The random-description control: the real description swapped for unrelated text.

A generator that ignores its condition scores as well with these as with the real description;
one that reads it should score clearly worse. The texts are about nothing a string or
classification task would ask for.
"""

from __future__ import annotations

import random

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
