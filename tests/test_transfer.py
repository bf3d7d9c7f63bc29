"""Transfer machinery on a small label-scoring registry (real all-MiniLM-L6-v2, few steps): the
multi-task LoRA, task-loss generator training, derived tasks and the description controls."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loragen.adapters import Basis, spec_from_config
from loragen.embeddings import TextEncoder
from loragen.encoder import EncoderModel
from loragen.evaluation.controls import mismatched_index
from loragen.generator import LearnedGenerator, load_generator, train_generator
from loragen.registry import Registry
from loragen.registry.multitask import load_multitask, save_multitask
from loragen.training.classify import train_classifier_experts
from loragen.training.derive import one_vs_rest
from loragen.training.experts import ExpertConfig
from loragen.training.generator_task import TaskTrainingConfig, _Conditions, task_loss, train_generator_for
from loragen.training.multitask import MultitaskConfig, train_multitask
from loragen.training.objective import TaskModel
from loragen.training.tasks import Instance, Task, read_tasks, write_tasks

ANIMALS = ["the cat sat on the mat", "a dog barked at the mailman", "the horse ran across the field",
           "birds sing in the morning", "a cow grazes in the meadow", "the fish swam upstream"]
MONEY = ["the stock market fell today", "she paid the electricity bill", "taxes are due in april",
         "the bank raised its rates", "he saved money for a car", "prices went up again"]
WEATHER = ["it rained all afternoon", "a storm is coming tonight", "the sun is shining brightly",
           "snow covered the hills", "fog rolled over the bay", "the wind howled outside"]
TOPICS = {"animal": ANIMALS, "money": MONEY, "weather": WEATHER}


def _binary(name: str, topic: str, family: str) -> Task:
    inst = [Instance(t, "yes" if k == topic else "no") for k, texts in TOPICS.items() for t in texts]
    return Task(name, [f"Is this sentence about {topic}? Answer yes or no."], inst * 2, ["no", "yes"], "train", family)


def _topic_task() -> Task:
    inst = [Instance(t, k) for k, texts in TOPICS.items() for t in texts]
    return Task("topic", ["Which topic is the sentence about?"], inst * 2, sorted(TOPICS), "train", "topic")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry of four label-scoring experts (two families), its encoder and task list."""
    root = tmp_path_factory.mktemp("transfer")
    tasks = [_binary("is_animal", "animal", "binary"), _binary("is_money", "money", "binary"),
             _binary("is_weather", "weather", "binary"), _topic_task()]
    encoder = EncoderModel.load()
    spec = spec_from_config(encoder.path, targets=["query", "value"], rank=4, base_model=encoder.path)
    basis = Basis.seeded(spec, 0)
    runs = train_classifier_experts(encoder, basis, tasks, ExpertConfig(steps=6, rows_per_task=2, checkpoints=2,
                                                                         checkpoint_every=2, warmup=2))
    registry = Registry.create(root / "registry", spec, encoder=TextEncoder(), basis=basis)
    for run in runs:
        registry.add_expert(run.task.name, run.checkpoints, run.task.descriptions, metrics=run.metrics)
    write_tasks(root / "tasks.jsonl", tasks)
    return {"root": root, "registry": registry, "encoder": encoder, "tasks": tasks}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_multitask_lora_is_a_peft_adapter_and_a_method(world):
    from peft import PeftModel
    from transformers import AutoModel

    registry, encoder = world["registry"], world["encoder"]
    before = _state(encoder.model)
    lora = train_multitask(registry, world["tasks"], TaskModel("classify", encoder), MultitaskConfig(steps=4, warmup=1))
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())
    assert any(float(b.abs().sum()) > 0 for b in lora.B.values())
    save_multitask(registry, lora)
    stored = load_multitask(registry)
    assert all(torch.equal(stored.B[m], lora.B[m]) for m in lora.B)

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(encoder.path), registry.path / "multitask")
    batch = encoder.tokenizer(["a dog barked"], return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state
        with stored.merged(encoder.model):
            ours = encoder.model(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    gen = load_generator("multitask", registry)
    out = gen.generate(["anything at all", "something else"])
    assert [o.metadata["method"] for o in out] == ["multitask", "multitask"]
    assert all(torch.equal(o.B[m], lora.B[m]) for o in out for m in lora.B)


def _mean_task_loss(gen: LearnedGenerator, base: TaskModel, tasks: list[Task]) -> float:
    cond = _Conditions(gen, tasks, [gen.registry.get(t.name).descriptions for t in tasks])
    batches = [t.split_instances()[0][:8] for t in tasks]
    with torch.no_grad():
        return float(task_loss(gen, base, cond, list(range(len(tasks))), [r[0] for r in cond.rows], batches,
                               torch.zeros(len(tasks), gen.model.config.latent)))


@pytest.mark.parametrize("method, residual", [("sg", True), ("icm", False)])
def test_task_loss_training_lowers_the_loss_keeps_the_base_and_round_trips(world, method, residual, tmp_path):
    registry, encoder, tasks = world["registry"], world["encoder"], world["tasks"]
    if residual and not (registry.path / "multitask").is_dir():
        save_multitask(registry, train_multitask(registry, tasks, TaskModel("classify", encoder),
                                                 MultitaskConfig(steps=2, warmup=1)))
    base = TaskModel("classify", encoder)
    before = _state(encoder.model)
    config = TaskTrainingConfig(steps=12, tasks_per_step=3, rows_per_task=4, lr=3e-3, validation_tasks=0.0,
                                eval_every=6)
    untrained = train_generator(registry, method, epochs=0, residual=residual, latent=16, description_encoder=False,
                                description_head=False)
    start = _mean_task_loss(untrained, base, tasks)
    gen = train_generator_for("task", registry, method, tasks, base, config, residual=residual,
                              out_dir=tmp_path / "gen", latent=16, description_encoder=False, description_head=False)
    assert _mean_task_loss(gen, base, tasks) < start
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())
    assert gen.config.objective == "task" and gen.config.cvae.residual is residual

    loaded = LearnedGenerator.from_pretrained(tmp_path / "gen", registry)
    descs = ["Is this sentence about weather? Answer yes or no.", "Which animal is it?"]
    for a, b in zip(gen.generate(descs, seed=3), loaded.generate(descs, seed=3)):
        assert all(torch.equal(a.B[m], b.B[m]) for m in a.B)


def _description_gap(gen: LearnedGenerator, base: TaskModel, tasks: list[Task]) -> float:
    """Mean task loss under another family's description minus under the task's own."""
    cond = _Conditions(gen, tasks, [gen.registry.get(t.name).descriptions for t in tasks])
    batches = [t.split_instances()[0][:8] for t in tasks]
    other = [next(j for j, u in enumerate(tasks) if u.cluster != t.cluster) for t in tasks]
    eps = torch.zeros(len(tasks), gen.model.config.latent)
    cols = list(range(len(tasks)))
    with torch.no_grad():
        own = task_loss(gen, base, cond, cols, [r[0] for r in cond.rows], batches, eps)
        wrong = task_loss(gen, base, cond, cols, [cond.rows[j][0] for j in other], batches, eps)
    return float(wrong - own)


def test_the_contrast_hinge_makes_the_own_description_matter(world):
    registry, encoder, tasks = world["registry"], world["encoder"], world["tasks"]
    base = TaskModel("classify", encoder)
    kw = {"latent": 16, "description_encoder": False, "description_head": False}
    start = _description_gap(train_generator(registry, "sg", epochs=0, **kw), base, tasks)
    config = TaskTrainingConfig(steps=12, tasks_per_step=4, rows_per_task=4, lr=3e-3, validation_tasks=0.0,
                                eval_every=6, contrast_weight=1.0, contrast_margin=1.0)
    gen = train_generator_for("task", registry, "sg", tasks, base, config, **kw)
    assert _description_gap(gen, base, tasks) > start + 0.05


def test_task_loss_training_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    import loragen.training.generator_task as generator_task

    registry, encoder, tasks = world["registry"], world["encoder"], world["tasks"]
    base = TaskModel("classify", encoder)
    kw = {"latent": 16, "description_encoder": False, "description_head": False, "progress": False}
    config = TaskTrainingConfig(steps=8, tasks_per_step=3, rows_per_task=2, lr=3e-3, validation_tasks=0.0,
                                eval_every=4)
    straight = train_generator_for("task", registry, "icm", tasks, base, config, out_dir=tmp_path / "a", **kw)

    real, calls = generator_task.task_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # step 6: after the state of step 4 was saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generator_task, "task_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_generator_for("task", registry, "icm", tasks, base, config, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(generator_task, "task_loss", real)
    resumed = train_generator_for("task", registry, "icm", tasks, base, config, out_dir=tmp_path / "b", resume=True,
                                  **kw)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_derived_tasks_come_from_the_training_split_only():
    topic = _topic_task()
    derived = one_vs_rest(topic)
    assert [d.name for d in derived] == ["topic:is:animal", "topic:is:money", "topic:is:weather"]
    train = {i.input for i in topic.split_instances()[0]}
    assert all({i.input for i in d.instances} <= train for d in derived)
    assert all(d.labels == ["no", "yes"] and d.extra["source"] == "topic" for d in derived)
    assert one_vs_rest(_binary("b", "animal", "binary")) == []


def test_mismatched_picks_another_family():
    names = ["a1", "a2", "b1", "c1"]
    families = ["a", "a", "b", "c"]
    for i in range(len(names)):
        j = mismatched_index(names, families, i, seed=0)
        assert j != i and families[j] != families[i]
        assert mismatched_index(names, families, i, seed=0) == j  # fixed per (name, seed)
    assert mismatched_index(["x", "y"], ["f", "f"], 0) == 1  # one family only: any other task


@pytest.mark.parametrize("command", ["generator", "multitask"])
def test_task_file_naming_no_expert_is_a_one_line_error(world, tmp_path, command):
    other = tmp_path / "other.jsonl"
    write_tasks(other, [Task("unrelated", ["d"], [Instance("a", "x"), Instance("b", "y")], ["x", "y"])])
    args = ["--tasks", str(other), "--registry", str(world["registry"].path)]
    if command == "generator":
        args += ["--method", "sg", "--objective", "task", "--out", str(tmp_path / "g")]
    proc = subprocess.run([sys.executable, "-m", "loragen.cli", "train", command, *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "names an expert" in proc.stderr
    assert not (tmp_path / "g").exists()


def test_task_file_without_instances_is_a_clear_error(tmp_path):
    bad = tmp_path / "empty.jsonl"
    bad.write_text(json.dumps({"task": "t", "definition": "d", "labels": ["a", "b"], "instances": []}) + "\n")
    with pytest.raises(ValueError, match="non-empty 'instances'"):
        read_tasks(bad)
