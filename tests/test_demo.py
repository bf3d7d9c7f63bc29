"""End to end on the real demo world, built once per run (conftest's `demo_experts`, `demo_world`):
build, search, generate, load with PEFT, complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loragen.config import Settings

pytestmark = pytest.mark.slow


def cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "loragen.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_build_is_idempotent_and_keeps_unseen_paraphrases_out(demo_world):
    from loragen.registry import Registry
    from loragen.demo.world import build_demo
    from loragen.training.tasks import read_tasks

    stamp = demo_world.manifest.stat().st_mtime
    assert build_demo(Settings().home).manifest.stat().st_mtime == stamp
    registry = Registry.open(demo_world.registry)
    tasks = {t.name: t for t in read_tasks(demo_world.tasks)}
    experts = registry.experts()
    assert len(experts) == len(tasks) >= 16
    for e in experts:
        assert tasks[e.name].descriptions[-1] not in e.descriptions
        assert len(e.checkpoints) >= 2
    summary = json.loads(demo_world.manifest.read_text())
    assert summary["experts"]["reverse"]["exact_match"] >= 0.8


def test_search_lists_the_reverse_expert_first(demo_experts):
    out = cli("registry", "search", "reverse the string", "-k", "3", "--registry", str(demo_experts.registry))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert "reverse" in lines[0].split()
    assert len(lines) == 3


def test_generate_nearest_loads_in_peft_and_reverses(demo_experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "a"
    res = cli("generate", "write the letters of the input in reverse order", "--method", "nearest",
              "--out", str(out), "--registry", str(demo_experts.registry))
    assert res.returncode == 0, res.stderr
    assert "reverse" in res.stdout and "ambiguous" not in res.stdout
    mixed = cli("generate", "write the letters of the input in reverse order", "--method", "weighted",
                "--temperature", "100", "--out", str(tmp_path / "mixed"), "--registry", str(demo_experts.registry))
    assert mixed.returncode == 0 and "ambiguous: it mixes experts" in mixed.stdout.splitlines()[0], mixed.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo_experts.base_model)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].r == 16
    done = cli("complete", "--adapter", str(out), "abcde")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "edcba"


def test_examples_correct_a_misread_description(demo_world, tmp_path):
    """A terse description sg misreads as sort on the demo world; three caesar_back_1 pairs move the weight."""
    description = "alphabetical predecessor"
    args = ["generate", description, "--method", "sg", "--generator", str(demo_world.generators / "sg"), "--seed", "0",
            "--registry", str(demo_world.registry)]
    plain = cli(*args, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    with_examples = cli(*args, "--out", str(tmp_path / "ex"), "--example", "bcd -> abc", "--example", "hello→gdkkn",
                        "--example", "zebra=>ydaqz")  # every arrow the CLI reads
    assert with_examples.returncode == 0, with_examples.stderr

    def heaviest(stdout: str) -> str:
        rows = [ln.split() for ln in stdout.splitlines() if "weight" in ln and "similarity" in ln]
        return max(rows, key=lambda r: float(r[r.index("weight") + 1]))[0]

    assert heaviest(plain.stdout) == "sort" and "examples log p" not in plain.stdout
    assert heaviest(with_examples.stdout) == "caesar_back_1" and "examples log p" in with_examples.stdout
    assert "examples fit 0.9" in with_examples.stdout and "no expert explains" not in with_examples.stdout
    # outputs no task of the registry produces: the evidence still picks one, and says it fits none
    nonsense = cli(*args, "--out", str(tmp_path / "odd"), "--example", "bcd=>qqxy", "--example", "hello=>zpvwq",
                   "--example", "zebra=>mmmmt")
    assert nonsense.returncode == 0, nonsense.stderr
    assert "no expert explains the examples" in nonsense.stdout.splitlines()[0], nonsense.stdout
    done = cli("complete", "--adapter", str(tmp_path / "ex"), "lemon")
    assert done.returncode == 0 and done.stdout.strip() == "kdlnm", done.stdout


def test_generated_adapter_through_peft_matches_our_merge(demo_experts, tmp_path):
    from peft import PeftModel

    from loragen.basemodel import BaseModel
    from loragen.generator import load_generator
    from loragen.registry import Registry

    registry = Registry.open(demo_experts.registry)
    lora = load_generator("weighted", registry).generate(["spell the word backwards"])[0]
    lora.save_pretrained(tmp_path / "w")
    base = BaseModel.load(demo_experts.base_model)
    ids = base.tokenizer(["hello="], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with lora.merged(base.model):
            ours = base.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(BaseModel.load(demo_experts.base_model).model, tmp_path / "w")
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_batched_completion_with_mixed_loras_equals_single_calls(demo_experts):
    from loragen.basemodel import BaseModel
    from loragen.registry import Registry

    registry = Registry.open(demo_experts.registry)
    by_name = {e.name: registry.lora(e) for e in registry.experts()}
    base = BaseModel.load(demo_experts.base_model)
    inputs = ["abcde", "xy", "hello", "loragen"]
    loras = [by_name["reverse"], None, by_name["caesar_1"], by_name["sort"]]
    batched = base.complete(inputs, loras=loras)
    singles = [base.complete([x], loras=[lo])[0] for x, lo in zip(inputs, loras)]
    assert batched == singles
    assert batched[0] == "edcba"
    # finish reasons, per row: the model ends "edcba" itself; two tokens cut "loragen" short
    done = base.completions(["abcde", "loragen"], loras=[by_name["reverse"], None], max_new_tokens=2)
    assert [d.finish_reason for d in done] == ["length", "length"] and done[0].text == "ed"
    assert [d.completion_tokens for d in done] == [2, 2]
    done = base.completions(["abcde", "loragen"], loras=[by_name["reverse"], None], max_new_tokens=32)
    assert [d.finish_reason for d in done] == ["stop", "stop"] and done[0].text == "edcba"
    tok = base.tokenizer
    for d, x in zip(done, ["abcde", "loragen"]):  # the text's tokens and the end of sequence; the prompt's own
        assert d.completion_tokens == len(tok(d.text, add_special_tokens=False)["input_ids"]) + 1
        assert d.prompt_tokens == len(tok(base.prompt(x), add_special_tokens=False)["input_ids"])
    # a stop string ends its own row only, before the string, counted up to the string's last token
    done = base.completions(["abcde", "loragen"], loras=[by_name["reverse"], None], stop=["c"])
    assert [(d.text, d.finish_reason) for d in done] == [("ed", "stop"), ("loragen", "stop")]
    assert done[0].completion_tokens == len(tok("edc", add_special_tokens=False)["input_ids"])
    assert base.complete(["abcde"], loras=[by_name["reverse"]], stop=["zz", "dc"]) == ["e"]


@pytest.mark.parametrize("args, message", [
    (["generate", "   ", "--out", "OUT"], "description 0 is empty"),
    (["generate", "reverse", "--out", "OUT", "--method", "magic"], "unknown method"),
    (["generate", "reverse", "--out", "OUT", "--registry", "/nonexistent/reg"], "no registry"),
    (["complete", "--adapter", "/nonexistent/adapter", "abc"], "no adapter directory"),
    (["generate", "reverse", "--out", "OUT", "--example", "abc"], "is not INPUT->OUTPUT"),
])
def test_bad_input_is_one_line_and_non_zero(demo_experts, tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    if "--registry" not in args and args[0] == "generate":
        args += ["--registry", str(demo_experts.registry)]
    res = cli(*args)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_train_experts_names_the_bad_line(demo_experts, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task": "a", "definition": "d", "instances": [{"input": "a", "output": "a"}]}\n{oops\n')
    res = cli("train", "experts", "--tasks", str(tasks), "--base", str(demo_experts.base_model),
              "--registry", str(tmp_path / "reg"))
    assert res.returncode != 0
    assert "tasks.jsonl:2" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reg").exists()


def test_train_experts_learns_a_new_registrys_basis_in_two_processes(demo_experts, tmp_path):
    from loragen.adapters import Basis
    from loragen.registry import Registry
    from loragen.training.tasks import Instance, Task, write_tasks

    words = ["abcde", "fghij", "klmno", "pqrst", "uvwxy", "zabcd", "efghi", "jklmn"]
    write_tasks(tmp_path / "tasks.jsonl", [Task(n, [f"{n} the word"], [Instance(w, f(w)) for w in words])
                                           for n, f in (("backwards", lambda w: w[::-1]), ("tail", lambda w: w[1:]))])
    args = ("train", "experts", "--tasks", str(tmp_path / "tasks.jsonl"), "--base", str(demo_experts.base_model),
            "--registry", str(tmp_path / "reg"), "--steps", "4", "--rows-per-task", "2", "--checkpoints", "2",
            "--rank", "4", "--targets", "q_proj,v_proj")
    res = cli(*args, "--basis-lr", "0.01", "--workers", "2")
    assert res.returncode == 0, res.stderr
    reg = Registry.open(tmp_path / "reg")
    seeded = Basis.seeded(reg.spec)
    assert any(not torch.allclose(a.abs(), seeded.A[m].abs()) for m, a in reg.basis.A.items())
    assert {e.name for e in reg.experts()} == {"backwards", "tail"}
    reg.close()
    res = cli(*args, "--basis-lr", "0.01")  # the registry exists now: its basis is fixed
    assert res.returncode != 0 and "basis is fixed" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_demo_run_serve_shows_the_loop_then_answers_on_loopback(demo_world):
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loragen.cli", "demo", "run", "--serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, answer = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/loras", json={"description": "reverse the letters"},
                                    timeout=30)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert answer is not None and answer.status_code == 200, answer
        assert answer.json()["neighbours"][0]["expert"] == "reverse"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "[weighted]" in out and "[sg]" in out and f"serving on http://127.0.0.1:{port}" in out
