"""Examples a description writes out itself: "reverse the word, e.g. garden -> nedrag".

People who describe a string task often show it on a word. Such a pair is the same evidence as one
passed in `examples` (`example_evidence.py`), so a request that brings no examples of its own uses
the ones its description holds, and its metadata says so (`examples_from_description`), so a
description misread on its words can be set right by its own example.

Only `->` and `→` mark a pair: `=>` is also JavaScript's function arrow, and a pair read from code
would be evidence for nothing. A side in double quotes or backticks may hold spaces; an unquoted side is one word, its
brackets, quotes and trailing sentence punctuation stripped. An unquoted pair must end its clause (end of text,
punctuation, or the next pair): in "hello world -> dlrow olleh" the sides are two words each, and reading
"world -> dlrow" would be evidence for the wrong thing, so that pair is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .task_vector import MAX_EXAMPLES, Example, TaskVectors

_ARROW = r"\s*(?:->|→)\s*"
_QUOTED = re.compile(r'(["`])(.+?)\1' + _ARROW + r'(["`])(.+?)\3')
_WORDS = re.compile(r"(\S+)" + _ARROW + r"(\S+)")
_CLAUSE_END = re.compile(r"\s*(?:$|\S+" + _ARROW + ")")
_EDGES = "\"'`()[]{}<>,;:"


def examples_in(description: str) -> list[Example]:
    """The input -> output pairs written in `description`, in order (at most MAX_EXAMPLES)."""
    pairs = [(m.group(2), m.group(4)) for m in _QUOTED.finditer(description)]
    rest = _QUOTED.sub(" ", description)
    for match in _WORDS.finditer(rest):
        left, right = match.groups()
        if right[-1] not in ".,;:!?)]}" and not _CLAUSE_END.match(rest, match.end()):
            continue  # more words follow: the pair's sides may be longer than one word
        source, target = left.strip(_EDGES), right.strip(_EDGES).rstrip(".!?").strip(_EDGES)
        if source and target:
            pairs.append((source, target))
    return [{"input": i, "output": o} for i, o in pairs[:MAX_EXAMPLES]]


def with_inline_examples(descriptions: Sequence[str], example_sets: Sequence[Sequence[Example]],
                         task_vectors: TaskVectors) -> tuple[list[list[Example]], list[bool]]:
    """Rows without examples take their description's own; the flags say which rows did. Only where
    the base model is a local causal LM: elsewhere a description's pairs are left as words (explicit
    examples there are an error, but a description should not become one)."""
    if task_vectors.spec.task_type != "CAUSAL_LM" or not Path(task_vectors.path).exists():
        return [list(s) for s in example_sets], [False] * len(example_sets)
    sets, inline = [], []
    for description, given in zip(descriptions, example_sets):
        own = [] if given else examples_in(description)
        sets.append(list(given) or own)
        inline.append(bool(own))
    return sets, inline
