"""The demo world's string-transformation tasks: each a rule in code and descriptions in package data.

Each task has four descriptions of its own (`sets`: `descriptions` then `unseen`). The last is kept
out of the registry: it is the unseen paraphrase that evaluation uses to check that generation
follows meaning, not wording. The registry gets the others plus the registry sets (`extra`,
`styled`, `written`), so it is described in many wordings, as a registry's users would describe it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from ..training.tasks import Instance, Task
from . import sets

VOWELS = set("aeiou")


def _shift(s: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in s)


def _swap_pairs(s: str) -> str:
    chars = list(s)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


@dataclass(frozen=True)
class DemoTask:
    name: str
    fn: Callable[[str], str]
    descriptions: tuple[str, ...]


# Each task's rule; its descriptions are package data (`sets`).
RULES: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("reverse", lambda s: s[::-1]),
    ("caesar_1", lambda s: _shift(s, 1)),
    ("caesar_2", lambda s: _shift(s, 2)),
    ("caesar_3", lambda s: _shift(s, 3)),
    ("caesar_back_1", lambda s: _shift(s, -1)),
    ("atbash", lambda s: "".join(chr(219 - ord(c)) for c in s)),
    ("swap_pairs", _swap_pairs),
    ("double_letters", lambda s: "".join(c + c for c in s)),
    ("rotate_left", lambda s: s[1:] + s[:1]),
    ("rotate_right", lambda s: s[-1:] + s[:-1]),
    ("mask_vowels", lambda s: "".join("*" if c in VOWELS else c for c in s)),
    ("drop_vowels", lambda s: "".join(c for c in s if c not in VOWELS)),
    ("sort", lambda s: "".join(sorted(s))),
    ("repeat_twice", lambda s: s + s),
    ("drop_first", lambda s: s[1:]),
    ("drop_last", lambda s: s[:-1]),
    ("every_other", lambda s: s[::2]),
    ("first_last_swap", lambda s: s[-1] + s[1:-1] + s[0]),
)


def _demo_tasks() -> tuple[DemoTask, ...]:
    own, unseen = sets.by_task("descriptions"), sets.by_task("unseen")
    return tuple(DemoTask(name, fn, (*own[name], *unseen[name])) for name, fn in RULES)


DEMO_TASKS: tuple[DemoTask, ...] = _demo_tasks()


def random_word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def demo_tasks(instances_per_task: int = 300, seed: int = 0, *, extra_descriptions: bool = True) -> list[Task]:
    """The demo tasks in the task-file format; the last description is the unseen paraphrase."""
    registry_sets = {name: sets.by_task(name) for name in sets.REGISTRY_SETS}
    tasks = []
    for i, t in enumerate(DEMO_TASKS):
        rng = random.Random(seed * 1000 + i)
        words = [random_word(rng) for _ in range(instances_per_task)]
        extra = ([text for name in sets.REGISTRY_SETS for text in registry_sets[name][t.name]]
                 if extra_descriptions else [])
        tasks.append(Task(
            name=t.name,
            descriptions=[*t.descriptions[:-1], *extra, t.descriptions[-1]],
            instances=[Instance(w, t.fn(w)) for w in words],
            cluster="strings",
            extra={"unseen_paraphrase": t.descriptions[-1]},
        ))
    return tasks
