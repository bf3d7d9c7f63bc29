"""Label-scoring experts on the real all-MiniLM-L6-v2 encoder (cls-tasks' classifier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ANIMALS = ["the cat sat on the mat", "a dog barked at the mailman", "the horse ran across the field",
           "birds sing in the morning", "a cow grazes in the meadow", "the fish swam upstream"]
OTHER = ["the stock market fell today", "she paid the electricity bill", "the train was late again",
         "he fixed the broken laptop", "taxes are due in april", "the meeting moved to friday"]


def task_line(name, definition, flip):
    yes, no = ("no", "yes") if flip else ("yes", "no")
    inst = [{"input": t, "output": yes} for t in ANIMALS] + [{"input": t, "output": no} for t in OTHER]
    return json.dumps({"task": name, "definition": definition, "labels": ["no", "yes"], "instances": inst * 2})


def test_train_label_scoring_experts_and_load_them_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from loragen.encoder import EncoderModel
    from loragen.registry import Registry

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(task_line("animals", "Is this sentence about an animal? Answer yes or no.", False) + "\n"
                     + task_line("not_animals", "Answer yes if the sentence is NOT about animals.", True) + "\n")
    reg_dir = tmp_path / "reg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "loragen.cli", "train", "experts", "--tasks", str(tasks),
                          "--registry", str(reg_dir), "--steps", "12", "--lr", "5e-3", "--checkpoints", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    registry = Registry.open(reg_dir)
    experts = {e.name: e for e in registry.experts()}
    assert set(experts) == {"animals", "not_animals"}
    assert registry.spec.task_type == "FEATURE_EXTRACTION"
    assert all("accuracy" in e.metrics and len(e.checkpoints) == 2 for e in experts.values())
    # Opposite label semantics: the two experts must disagree somewhere, or training did nothing.
    a, b = (registry.final_b(experts[n]) for n in ("animals", "not_animals"))
    assert any(not torch.allclose(a[m], b[m]) for m in a)

    lora = registry.lora(experts["not_animals"])
    lora.save_pretrained(tmp_path / "adapter")
    encoder = EncoderModel.load()
    with torch.no_grad():
        with lora.merged(encoder.model):
            ours = encoder.model(**encoder.tokenizer(["a dog"], return_tensors="pt")).last_hidden_state
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(encoder.path), tmp_path / "adapter")
        theirs = peft_model(**encoder.tokenizer(["a dog"], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_label_scoring_needs_labels(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task": "t", "definition": "d", "instances": [{"input": "a", "output": "b"}] * 4}) + "\n")
    res = subprocess.run([sys.executable, "-m", "loragen.cli", "train", "experts", "--tasks", str(tasks),
                          "--registry", str(tmp_path / "reg"), "--steps", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "need 'labels'" in res.stderr
    assert not (tmp_path / "reg").exists()
