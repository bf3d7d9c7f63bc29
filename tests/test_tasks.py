from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loragen.demo import sets
from loragen.demo.tasks import DEMO_TASKS, demo_tasks
from loragen.training.tasks import TaskFileError, read_tasks, write_tasks


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def good(name="t", **extra):
    return json.dumps({"task": name, "definition": "do it", "instances": [{"input": "a", "output": "b"}], **extra})


def test_reads_definition_and_descriptions(tmp_path):
    f = write(tmp_path / "t.jsonl", [
        json.dumps({"task": "x", "definition": "main", "descriptions": ["main", "other"],
                    "instances": [{"input": "i", "output": "yes"}], "labels": ["no", "yes"], "split": "heldout"}),
    ])
    [task] = read_tasks(f)
    assert task.descriptions == ["main", "other"] and task.labels == ["no", "yes"] and task.split == "heldout"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"definition": "d", "instances": [{"input": "a", "output": "b"}]}), "missing 'task'"),
    (json.dumps({"task": "x", "instances": [{"input": "a", "output": "b"}]}), "no description"),
    (json.dumps({"task": "x", "definition": "d", "instances": []}), "non-empty 'instances'"),
    (json.dumps({"task": "x", "definition": "d", "instances": [{"input": 1, "output": "b"}]}), "string 'input'"),
    (json.dumps({"task": "x", "definition": "d", "labels": ["a", "c"],
                 "instances": [{"input": "a", "output": "b"}]}), "not in 'labels'"),
])
def test_a_bad_line_names_its_line_number(tmp_path, bad, message):
    f = write(tmp_path / "t.jsonl", [good("a"), bad, good("c")])
    with pytest.raises(TaskFileError, match=rf"t.jsonl:2: .*{message}"):
        read_tasks(f)


def test_duplicate_task_names_are_refused(tmp_path):
    with pytest.raises(TaskFileError, match=":2: duplicate"):
        read_tasks(write(tmp_path / "t.jsonl", [good("a"), good("a")]))


def test_split_is_deterministic_and_disjoint():
    [task] = demo_tasks()[:1]
    train, test = task.split_instances(0.7, seed=0)
    again = task.split_instances(0.7, seed=0)
    assert (train, test) == again and len(train) + len(test) == len(task.instances)


def test_demo_tasks_round_trip_and_have_four_descriptions(tmp_path):
    tasks = demo_tasks(instances_per_task=5)
    assert len(tasks) >= 16 and all(len(t.descriptions) >= 4 for t in tasks)
    assert {t.name for t in tasks} == {t.name for t in DEMO_TASKS}
    write_tasks(tmp_path / "d.jsonl", tasks)
    back = read_tasks(tmp_path / "d.jsonl")
    assert [t.descriptions for t in back] == [t.descriptions for t in tasks]
    reverse = next(t for t in back if t.name == "reverse")
    assert all(i.output == i.input[::-1] for i in reverse.instances)


def test_extra_paraphrases_are_unique_and_keep_the_unseen_one_last():
    by_name = {t.name: t for t in demo_tasks(instances_per_task=5)}
    plain = {t.name: t for t in demo_tasks(instances_per_task=5, extra_descriptions=False)}
    for name, task in by_name.items():
        unseen = task.extra["unseen_paraphrase"]
        assert task.descriptions[-1] == unseen == plain[name].descriptions[-1]
        assert task.descriptions.count(unseen) == 1
        assert len(set(task.descriptions)) == len(task.descriptions) >= len(plain[name].descriptions) + 10


def test_no_registry_description_is_a_scored_paraphrase():
    tasks = demo_tasks(instances_per_task=5)
    key = lambda d: d.lower().rstrip(".!?")  # noqa: E731
    registry = {key(d) for t in tasks for d in t.descriptions[:-1]}
    unseen = {key(t.descriptions[-1]) for t in tasks}
    scored = {key(d) for name in sets.TEST_SETS for ds in sets.by_task(name).values() for d in ds}
    assert not registry & unseen and not registry & scored
    assert all(t.descriptions.count(t.descriptions[-1]) == 1 for t in tasks)


def test_written_descriptions_keep_clear_of_the_held_back_paraphrase():
    # the rule they were filtered by: two shared content-word stems (first five letters) is too close
    stop = set("a an the of to in on and or with each every its it is be by for from as at that this so "
               "word words letter letters character characters into one".split())
    stems = lambda d: {w[:5] for w in re.findall(r"[a-z]+", d.lower()) if w not in stop and len(w) > 2}  # noqa: E731
    written = sets.by_task("written")
    for task in DEMO_TASKS:
        held_back = stems(task.descriptions[-1])
        assert written[task.name]
        assert all(len(stems(d) & held_back) < 2 for d in written[task.name])


def test_demo_sets_are_package_data_that_installs_carry():
    import fnmatch
    from importlib import resources

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data = resources.files("loragen.demo") / "data"
    names = sorted(p.name for p in data.iterdir() if p.is_file())
    assert "README.md" in names and all(sets.texts(n[:-6]) for n in names if n.endswith(".jsonl"))
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["loragen"]
    assert all(any(fnmatch.fnmatch(f"demo/data/{n}", g) for g in globs) for n in names)
