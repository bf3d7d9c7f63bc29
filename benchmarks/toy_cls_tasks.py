"""Write a small task file in the cls-tasks format with tasks of its own (none from cls-tasks).

    python benchmarks/toy_cls_tasks.py /tmp/toy-cls.jsonl

Eight `train` and three `heldout` English classification tasks, generated from templates with a
fixed seed, so `loragen bench cls --data` can be shown to run on a file other than cls-tasks.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ANIMALS = ["dog", "cat", "horse", "sparrow", "goat", "otter", "fox", "rabbit", "owl", "cow"]
THINGS = ["table", "bicycle", "lamp", "river", "letter", "window", "train", "garden", "song", "coat"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"]
WORDS = ["chair", "happy", "quickly", "paper", "mountain", "seven", "music", "bread", "silver", "cloud"]
FOODS = ["bread", "cheese", "apple", "rice", "soup", "noodles", "carrot", "yoghurt", "pie", "beans"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "screwdriver", "rake", "axe"]
FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "peach", "lemon", "kiwi"]
VEGETABLES = ["carrot", "leek", "onion", "cabbage", "spinach", "potato", "pea", "celery", "radish", "kale"]
PEOPLE = ["Anna", "the teacher", "my brother", "the farmer", "Tom", "our neighbour", "the pilot", "Maria"]


def _sentence(rng: random.Random, noun: str) -> str:
    return f"{rng.choice(PEOPLE)} {rng.choice(['saw', 'drew', 'talked about', 'looked for'])} the {noun} yesterday."


def _task(name: str, split: str, definition: str, paraphrases: list[str], make: Callable[[random.Random], tuple[str, str]],
          rng: random.Random, n: int = 60) -> dict:
    instances = [dict(zip(("input", "output"), make(rng))) for _ in range(n)]
    return {"task": name, "definition": definition, "descriptions": [definition, *paraphrases], "split": split,
            "cluster": name.split("_")[0], "labels": sorted({i["output"] for i in instances}), "instances": instances}


def tasks(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def parity(r):
        x = r.randrange(1000)
        return f"The number is {x}.", "even" if x % 2 == 0 else "odd"

    def animal(r):
        yes = r.random() < 0.5
        return _sentence(r, r.choice(ANIMALS if yes else THINGS)), "yes" if yes else "no"

    def question(r):
        noun = r.choice(THINGS + ANIMALS)
        q = r.random() < 0.5
        return (f"Where did you put the {noun}?" if q else f"I put the {noun} outside."), "question" if q else "statement"

    def colour(r):
        c = r.random() < 0.5
        return r.choice(COLOURS if c else WORDS), "yes" if c else "no"

    def weather(r):
        good = r.random() < 0.5
        text = r.choice(["sunny and warm", "a light breeze and clear skies", "mild with sunshine"] if good
                        else ["freezing rain", "a violent storm with hail", "cold, grey and windy"])
        return f"Tomorrow will be {text}.", "pleasant" if good else "unpleasant"

    def food_tool(r):
        f = r.random() < 0.5
        return r.choice(FOODS if f else TOOLS), "food" if f else "tool"

    def larger(r):
        x = r.randrange(101)
        return f"{x}", "yes" if x > 50 else "no"

    def tense(r):
        past = r.random() < 0.5
        who, noun = r.choice(PEOPLE), r.choice(THINGS)
        return (f"{who} painted the {noun}." if past else f"{who} paints the {noun}."), "past" if past else "present"

    def fruit(r):
        f = r.random() < 0.5
        return r.choice(FRUITS if f else VEGETABLES), "fruit" if f else "vegetable"

    def review(r):
        good = r.random() < 0.5
        text = r.choice(["Works perfectly, I love it.", "Great value and fast delivery.", "Exactly what I wanted."]
                        if good else ["Broke after one day.", "Terrible quality, do not buy.", "It never worked at all."])
        return text, "positive" if good else "negative"

    def plural(r):
        noun = r.choice(THINGS + ANIMALS)
        many = r.random() < 0.5
        return (noun + "s" if many else noun), "plural" if many else "singular"

    spec = [
        ("parity_number", "train", "Decide whether the number in the input is even or odd.", ["Is the number even or odd?"], parity),
        ("animal_mention", "train", "Answer yes if the sentence mentions an animal, otherwise no.", ["Does the sentence talk about an animal?"], animal),
        ("question_detect", "train", "Classify the sentence as a question or a statement.", ["Is this a question or a statement?"], question),
        ("colour_word", "train", "Answer yes if the word is the name of a colour, otherwise no.", ["Is the given word a colour?"], colour),
        ("weather_mood", "train", "Classify the weather forecast as pleasant or unpleasant.", ["Will the weather be nice or not?"], weather),
        ("object_kind", "train", "Say whether the object is a food or a tool.", ["Food or tool?"], food_tool),
        ("number_size", "train", "Answer yes if the number is larger than fifty, otherwise no.", ["Is the value above 50?"], larger),
        ("verb_tense", "train", "Say whether the sentence is in the past tense or the present tense.", ["Past or present tense?"], tense),
        ("produce_kind", "heldout", "Classify the item as a fruit or a vegetable.", ["Is it a fruit or a vegetable?"], fruit),
        ("review_polarity", "heldout", "Decide whether the product review is positive or negative.", ["Is the customer happy?"], review),
        ("noun_number", "heldout", "Say whether the noun is singular or plural.", ["One thing or many?"], plural),
    ]
    return [_task(name, split, d, p, make, rng) for name, split, d, p, make in spec]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/toy_cls_tasks.py OUT.jsonl", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(t) + "\n" for t in tasks()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
