"""The demo world's string-transformation tasks, each with paraphrased descriptions.

The last description of each task is kept out of the registry: it is the unseen paraphrase that
evaluation uses to check that generation follows meaning, not wording. The registry gets the others
plus the extra paraphrases of `demo_paraphrases`, `demo_styled_paraphrases` and
`demo_written_paraphrases`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from .demo_paraphrases import EXTRA_DESCRIPTIONS
from .demo_styled_paraphrases import STYLED_DESCRIPTIONS
from .demo_written_paraphrases import WRITTEN_DESCRIPTIONS
from .tasks import Instance, Task

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


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("reverse", lambda s: s[::-1], (
        "write the letters of the input in reverse order",
        "reverse the input string",
        "reverse the string so the last letter comes first",
        "spell the word backwards",
    )),
    DemoTask("caesar_1", lambda s: _shift(s, 1), (
        "shift every letter one place forward in the alphabet",
        "replace each letter with the letter that follows it, z wraps to a",
        "apply a Caesar cipher with a shift of one",
        "encode each character as its alphabetical successor",
    )),
    DemoTask("caesar_2", lambda s: _shift(s, 2), (
        "shift every letter two places forward in the alphabet",
        "replace each letter with the letter two positions later, wrapping around",
        "apply a Caesar cipher with a shift of two",
        "move each character forward by two letters",
    )),
    DemoTask("caesar_3", lambda s: _shift(s, 3), (
        "shift every letter three places forward in the alphabet",
        "replace each letter with the one three positions later, wrapping after z",
        "apply a Caesar cipher with a shift of three",
        "encrypt with the classic Caesar shift of 3",
    )),
    DemoTask("caesar_back_1", lambda s: _shift(s, -1), (
        "shift every letter one place back in the alphabet",
        "replace each letter with the letter before it, a wraps to z",
        "apply a Caesar cipher with a shift of minus one",
        "decode each character to its alphabetical predecessor",
    )),
    DemoTask("atbash", lambda s: "".join(chr(219 - ord(c)) for c in s), (
        "mirror each letter in the alphabet so a becomes z and b becomes y",
        "apply the atbash cipher to the input",
        "replace every letter with its opposite letter counted from the end of the alphabet",
        "map the alphabet onto itself reversed, letter by letter",
    )),
    DemoTask("swap_pairs", _swap_pairs, (
        "swap each pair of adjacent letters",
        "exchange the first and second letters, then the third and fourth, and so on",
        "swap neighbouring characters two at a time",
        "flip the order within every consecutive pair of letters",
    )),
    DemoTask("double_letters", lambda s: "".join(c + c for c in s), (
        "duplicate every letter of the input",
        "write each character twice in a row",
        "double each letter so abc becomes aabbcc",
        "repeat every single character two times",
    )),
    DemoTask("rotate_left", lambda s: s[1:] + s[:1], (
        "move the first letter to the end of the string",
        "rotate the string left by one position",
        "take the leading character and append it after the last one",
        "cycle the letters one step to the left",
    )),
    DemoTask("rotate_right", lambda s: s[-1:] + s[:-1], (
        "move the last letter to the front of the string",
        "rotate the string right by one position",
        "take the final character and put it before the first one",
        "cycle the letters one step to the right",
    )),
    DemoTask("mask_vowels", lambda s: "".join("*" if c in VOWELS else c for c in s), (
        "replace every vowel with an asterisk",
        "mask the vowels a e i o u with a star symbol",
        "hide each vowel behind a * character and keep consonants",
        "censor the vowels by writing * in their place",
    )),
    DemoTask("drop_vowels", lambda s: "".join(c for c in s if c not in VOWELS), (
        "remove every vowel from the input",
        "delete the letters a e i o u and keep the consonants",
        "strip out all vowels",
        "write only the consonants of the word",
    )),
    DemoTask("sort", lambda s: "".join(sorted(s)), (
        "sort the letters in alphabetical order",
        "arrange the characters of the input from a to z",
        "put the letters into dictionary order",
        "order every character alphabetically, smallest first",
    )),
    DemoTask("repeat_twice", lambda s: s + s, (
        "write the whole input twice in a row",
        "repeat the string two times back to back",
        "concatenate the input with itself",
        "say the word and then say it again without a gap",
    )),
    DemoTask("drop_first", lambda s: s[1:], (
        "remove the first letter of the string",
        "delete the leading character and keep the rest",
        "drop the initial letter",
        "output everything except the opening character",
    )),
    DemoTask("drop_last", lambda s: s[:-1], (
        "remove the last letter of the string",
        "delete the final character and keep the rest",
        "drop the trailing letter",
        "output everything except the closing character",
    )),
    DemoTask("every_other", lambda s: s[::2], (
        "keep every other letter starting with the first",
        "write the letters at odd positions only, first, third, fifth and so on",
        "skip every second character",
        "take alternate characters beginning at the start",
    )),
    DemoTask("first_last_swap", lambda s: s[-1] + s[1:-1] + s[0], (
        "swap the first and the last letter",
        "exchange the opening and closing characters and keep the middle",
        "put the last letter first and the first letter last",
        "trade places between the initial and final letters",
    )),
)


def random_word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def demo_tasks(instances_per_task: int = 300, seed: int = 0, *, extra_descriptions: bool = True) -> list[Task]:
    """The demo tasks in the task-file format; the last description is the unseen paraphrase."""
    tasks = []
    for i, t in enumerate(DEMO_TASKS):
        rng = random.Random(seed * 1000 + i)
        words = [random_word(rng) for _ in range(instances_per_task)]
        extra = ([*EXTRA_DESCRIPTIONS[t.name], *STYLED_DESCRIPTIONS[t.name], *WRITTEN_DESCRIPTIONS[t.name]]
                 if extra_descriptions else [])
        tasks.append(Task(
            name=t.name,
            descriptions=[*t.descriptions[:-1], *extra, t.descriptions[-1]],
            instances=[Instance(w, t.fn(w)) for w in words],
            cluster="strings",
            extra={"unseen_paraphrase": t.descriptions[-1]},
        ))
    return tasks
