"""`loragen batch` on a tiny real world: a character-tokenizer Llama saved in HF format, a registry
of synthetic experts over it, and a tiny trained sg generator. Real components throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loragen.adapters import spec_from_config
from loragen.basemodel import BaseModel
from loragen.batch import BatchConfig, read_items, run_batch
from loragen.batch.items import BatchItem, ItemError
from loragen.evaluation.evaluators import CausalGreedy, LabelScoring, evaluator_for
from loragen.generator import train_generator
from loragen.registry import Registry
from loragen.training.tasks import Instance

EXPERTS = {
    "reverse": ["reverse the string", "write the letters backwards"],
    "upper": ["make every letter uppercase", "capitalise all characters"],
    "sort": ["sort the letters alphabetically", "put the characters in order"],
    "double": ["repeat every letter twice", "double each character"],
    "vowels": ["remove the vowels", "delete a, e, i, o and u"],
}
TRAIN = dict(epochs=3, batch=4, latent=16, hidden=64, lr=3e-3, val_fraction=0.2, patience=10)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def _base_model(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loragen.demo.world import build_tokenizer

    tok = build_tokenizer(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("batch-world")
    _base_model(root / "base")
    spec = spec_from_config(root / "base", targets=["q_proj", "v_proj", "down_proj"], rank=4,
                            base_model=str(root / "base"))
    reg = Registry.create(root / "registry", spec, encoder=encoder, seed=0)
    gen = torch.Generator().manual_seed(1)
    for name, descriptions in EXPERTS.items():
        centre = {m.name: 2.0 * torch.randn(spec.num_layers, m.out_features, spec.rank, generator=gen)
                  for m in spec.modules}
        cps = [{m: c + 0.05 * torch.randn(c.shape, generator=gen) for m, c in centre.items()} for _ in range(3)]
        reg.add_expert(name, cps, descriptions)
    train_generator(reg, "sg", seed=0, out_dir=root / "generators" / "sg", **TRAIN)
    return root


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loragen.cli", "batch", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _items(n: int) -> list[dict]:
    verbs = ["reverse", "sort", "double", "uppercase", "drop the vowels of"]
    return [{"id": f"item-{i}", "description": f"{verbs[i % 5]} the word, variant {i}"} for i in range(n)]


# ------------------------------------------------------------------ evaluators, known answers
def test_causal_greedy_exact_match_and_nll(world):
    base = BaseModel.load(world / "base")
    lora = Registry.open(world / "registry").lora("reverse")
    inputs = ["abc", "hello", "xyz", "qq"]
    plain = base.complete(inputs, max_new_tokens=4)
    with lora.merged(base.model):
        adapted = base.complete(inputs, max_new_tokens=4)
    assert plain != adapted  # the expert changes what the model says
    half = [Instance(x, y) for x, y in zip(inputs[:2], plain[:2])]
    half += [Instance(x, y + "z") for x, y in zip(inputs[2:], plain[2:])]  # wrong on purpose
    evaluator = CausalGreedy(base, max_new_tokens=4)
    scores = evaluator.score([None, lora, None], [half, [Instance(x, y) for x, y in zip(inputs, adapted)],
                                                  [Instance(x, y) for x, y in zip(inputs, adapted)]])
    assert [s["score"] for s in scores] == [0.5, 1.0, sum(p == a for p, a in zip(plain, adapted)) / 4]
    # NLL by hand for one pair: -mean log p(output tokens + eos | prompt).
    tok = base.tokenizer
    prompt = tok(base.prompt("abc"), add_special_tokens=False)["input_ids"]
    target = tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(base.model(torch.tensor([prompt + target])).logits[0].float(), -1)
    want = -sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target)) / len(target)
    got = evaluator.score([None], [[Instance("abc", "cba")]])[0]["nll"]
    assert got == pytest.approx(want, rel=1e-4)


def test_label_scoring_accuracy():
    from loragen.embeddings import default_model_path
    from loragen.encoder import EncoderModel

    encoder = EncoderModel.load()
    labels = ["an animal", "money and finance"]
    texts = ["the cat chased a mouse", "the bank raised interest rates", "a horse in the field",
             "investors lost money on the stock market"]
    with torch.no_grad():
        pred = (encoder.embed(texts) @ encoder.embed(labels).T).argmax(-1).tolist()
    truth = [labels[p] for p in pred]
    assert truth == ["an animal", "money and finance", "an animal", "money and finance"]
    wrong_last = truth[:3] + [labels[1 - pred[3]]]
    evaluator = LabelScoring(encoder)
    scores = evaluator.score([None, None], [[Instance(t, y) for t, y in zip(texts, truth)],
                                            [Instance(t, y) for t, y in zip(texts, wrong_last)]], [labels, None])
    assert [s["score"] for s in scores] == [1.0, 0.75]  # the second derives its labels from the outputs
    spec = spec_from_config(default_model_path(), targets=["query", "value"], rank=2,
                            base_model=str(default_model_path()))
    assert isinstance(evaluator_for(spec), LabelScoring)


# ------------------------------------------------------------------ input parsing
def test_read_items_records_each_bad_line(tmp_path):
    task_line = {"task": "t1", "definition": "reverse it", "cluster": "fam", "split": "heldout",
                 "instances": [{"input": str(i), "output": str(i)} for i in range(10)]}
    path = _write(tmp_path / "in.jsonl", [
        {"id": "a", "description": "reverse the string"}, "{oops", {"id": "b"}, {"description": "no id"},
        {"id": "c", "description": "x" * 4001}, {"id": "a", "description": "again"}, "", task_line,
        {"id": "d", "description": "sort", "instances": [{"input": 1}]}])
    parsed = read_items(path)
    good = [p for p in parsed if isinstance(p, BatchItem)]
    bad = {p.line: p for p in parsed if isinstance(p, ItemError)}
    assert [g.id for g in good] == ["a", "t1"]
    assert good[1].group == "fam" and good[1].split == "heldout" and len(good[1].instances) == 3
    assert "not valid JSON" in bad[2].message and bad[2].key == "line:2"
    assert "missing field 'description'" in bad[3].message and bad[3].key == "b"
    assert "missing field 'id'" in bad[4].message
    assert "4001 characters; the limit is 4000" in bad[5].message
    assert "duplicate id 'a' (first on line 1)" in bad[6].message and bad[6].key == "line:6"
    assert "'instances' must be a list" in bad[9].message


# ------------------------------------------------------------------ the command
def test_bad_lines_are_recorded_the_rest_proceed_and_the_exit_code_counts_them(world, tmp_path):
    lines = [*_items(3), "not json", {"id": "no-desc"}, {"id": "long", "description": "y" * 5000},
             {"id": "odd", "description": "sort the letters", "methods": ["nearest", "bogus"]}]
    out = tmp_path / "out"
    res = _cli(str(_write(tmp_path / "in.jsonl", lines)), "--out", str(out), "--method", "nearest,topk,sg",
               "--registry", str(world / "registry"), "--generator", str(world / "generators"), "--batch-size", "2")
    assert res.returncode == 4, res.stderr
    assert "7 items: 10 adapters written, 0 already done, 4 items failed" in res.stdout
    records = _manifest(out)
    ok = [r for r in records if r["status"] == "ok"]
    want = {(f"item-{i}", m) for i in range(3) for m in ("nearest", "topk", "sg")} | {("odd", "nearest")}
    assert {(r["id"], r["method"]) for r in ok} == want
    for r in ok:  # the manifest names every output, and each is a complete adapter
        assert (out / r["path"] / "adapter_config.json").is_file()
        assert (out / r["path"] / "adapter_model.safetensors").is_file()
        assert r["neighbours"] and set(r["timings"]) == {"generate_s", "write_s"}
    sg = [r for r in ok if r["method"] == "sg"]
    assert all(isinstance(r["ood"], bool) and isinstance(r["ambiguous"], bool) for r in sg)
    errors = {r["id"]: r["error"] for r in records if r["status"] == "error"}
    assert "not valid JSON" in errors["line:4"] and "missing field 'description'" in errors["no-desc"]
    assert "the limit is 4000" in errors["long"] and "unknown method 'bogus'" in errors["odd"]


def test_reruns_leave_one_record_per_id_and_method(world, tmp_path):
    """A rerun retries what failed (here an unknown per-item method, which fails again) and the
    manifest keeps only the latest record of each (id, method), not one more per run."""
    lines = [*_items(3), "not json", {"id": "no-desc"},
             {"id": "odd", "description": "sort the letters", "methods": ["nearest", "bogus"]}]
    config = BatchConfig(input=_write(tmp_path / "in.jsonl", lines), out=tmp_path / "out",
                         registry=world / "registry", methods=["nearest"], batch_size=2)
    first = run_batch(config)
    keys = [(r["id"], r["method"]) for r in _manifest(config.out)]
    assert len(keys) == len(set(keys)) == 7 and first.exit_code == 3
    for _ in range(2):
        again = run_batch(config)
        assert again.failed_items == first.failed_items and again.skipped == 4 and again.written == 0
        records = _manifest(config.out)
        assert [(r["id"], r["method"]) for r in records] == keys  # same pairs, same order
    by_key = {(r["id"], r["method"]): r for r in records}
    assert by_key[("odd", "bogus")]["status"] == "error" and by_key[("odd", "nearest")]["status"] == "ok"
    assert not list(config.out.glob(".manifest.jsonl.*"))  # no temp file left behind


def test_an_unknown_method_flag_is_a_one_line_error(world, tmp_path):
    path = _write(tmp_path / "in.jsonl", _items(2))
    res = _cli(str(path), "--out", str(tmp_path / "out"), "--method", "nearest,nope", "--registry", str(world / "registry"))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: unknown method 'nope'; choose from nearest, weighted, topk, uniform, multitask, icm, sg"]
    res = _cli(str(path), "--out", str(tmp_path / "out"), "--method", "icm", "--registry", str(world / "registry"))
    assert res.returncode == 2 and "needs a trained generator" in res.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _state(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every adapter weights file: a regenerated adapter gets a new inode."""
    return {str(p.parent.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (out / "adapters").glob("*/*/adapter_model.safetensors")}


def test_resume_after_an_interrupt_regenerates_nothing(world, tmp_path):
    config = BatchConfig(input=_write(tmp_path / "in.jsonl", _items(7)), out=tmp_path / "out",
                         registry=world / "registry", methods=["weighted", "sg"],
                         generators={"sg": world / "generators" / "sg"}, batch_size=2)

    def interrupt(chunk: int) -> None:
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(config, after_chunk=interrupt)
    first = _manifest(config.out)
    assert len(first) == 8 and {r["id"] for r in first} == {f"item-{i}" for i in range(4)}
    before = _state(config.out)
    assert len(before) == 8
    with (config.out / "manifest.jsonl").open("a") as f:
        f.write('{"id": "item-9", "meth')  # a kill in the middle of a write leaves a torn line
    summary = run_batch(config)
    assert summary.skipped == 8 and summary.written == 6 and summary.exit_code == 0
    after = _state(config.out)
    assert {k: after[k] for k in before} == before  # nothing done was rewritten
    assert len(after) == 14
    records = _manifest_lenient(config.out)
    pairs = [(r["id"], r["method"]) for r in records if r["status"] == "ok"]
    assert len(pairs) == len(set(pairs)) == 14
    assert run_batch(config).written == 0  # a third run has nothing to do


def _manifest_lenient(out: Path) -> list[dict]:
    records = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def test_ctrl_c_leaves_a_manifest_a_rerun_resumes_from(world, tmp_path):
    path = _write(tmp_path / "in.jsonl", _items(600))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "loragen.cli", "batch", str(path), "--out", str(out), "--method", "nearest",
            "--registry", str(world / "registry"), "--batch-size", "1"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt; give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    done = {r["id"] for r in _manifest_lenient(out) if r["status"] == "ok"}
    assert 20 <= len(done) < 600
    finished = [p for p in (out / "adapters").glob("*/*") if not p.name.startswith(".")]
    assert all((p / "adapter_model.safetensors").is_file() and (p / "adapter_config.json").is_file() for p in finished)
    # the manifest is the record: an adapter written just before the signal, whose line was not yet
    # appended, is not done and is regenerated; every adapter the manifest names must stay as it was
    named = {r["path"] for r in _manifest_lenient(out) if r["status"] == "ok"}
    before = {k: v for k, v in _state(out).items() if k in named}
    assert len(before) == len(done)
    res = _cli(str(path), "--out", str(out), "--method", "nearest", "--registry", str(world / "registry"),
               "--batch-size", "64")
    assert res.returncode == 0, res.stderr
    assert f"{600 - len(done)} adapters written, {len(done)} already done, 0 items failed" in res.stdout
    after = _state(out)
    assert len(after) == 600 and {k: after[k] for k in before} == before
    assert not list((out / "adapters").glob("**/.*.tmp"))


def test_peft_loads_an_adapter_the_batch_wrote(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    items = [*_items(2), {"id": "given", "description": "reverse the word", "examples": [{"input": "ab", "output": "ba"}]},
             {"id": "written", "description": "reverse the word, e.g. ab -> ba"}]
    res = _cli(str(_write(tmp_path / "in.jsonl", items)), "--out", str(out), "--method", "sg",
               "--registry", str(world / "registry"), "--generator", str(world / "generators" / "sg"))
    assert res.returncode == 0, res.stderr
    records = {r["id"]: r for r in _manifest(out)}
    assert records["item-0"]["examples_used"] is False and records["item-0"]["examples_fit"] is None
    for name, written in (("given", False), ("written", True)):
        r = records[name]
        assert r["examples_used"] is True and r["examples_from_description"] is written
        assert 0 < r["examples_fit"] <= 1 and r["examples_ood"] == (r["examples_fit"] < 0.5)
    pairs = {n: [(x["expert"], x["example_logprob"]) for x in records[n]["neighbours"]] for n in ("given", "written")}
    assert sorted(pairs["given"]) == sorted(pairs["written"])  # the same pair scored the same candidates
    record = records["item-0"]
    adapter = out / record["path"]
    from loragen.adapters import Lora

    lora = Lora.from_pretrained(adapter)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), adapter).eval()
        theirs = peft(ids).logits
        base = AutoModelForCausalLM.from_pretrained(world / "base").eval()
        plain = base(ids).logits
        with lora.merged(base):
            ours = base(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, ours, atol=1e-3)  # the adapter does something


# ------------------------------------------------------------------ --eval
def test_eval_scores_every_method_and_baseline(world, tmp_path):
    base = BaseModel.load(world / "base")
    inputs = ["abc", "hello", "xyz", "kite", "moon"]
    outputs = base.complete(inputs, loras=[Registry.open(world / "registry").lora("reverse")] * 5, max_new_tokens=3)
    lines = [
        {"id": "reverse", "description": "reverse the string", "group": "strings", "split": "registry",
         "instances": [{"input": x, "output": y} for x, y in zip(inputs, outputs)]},
        {"task": "sort", "definition": "sort the letters alphabetically", "cluster": "strings",
         "instances": [{"input": x, "output": x[::-1]} for x in inputs * 2]},
        {"id": "nothing-to-score", "description": "double each character"},
    ]
    out = tmp_path / "out"
    res = _cli(str(_write(tmp_path / "in.jsonl", lines)), "--out", str(out), "--method", "sg,weighted",
               "--registry", str(world / "registry"), "--generator", str(world / "generators"), "--eval")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "exact_match" and "## registry" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    rows = {(r["item"], r["method"]): r for r in report["rows"]}
    want = {"base", "oracle", "uniform", "nearest", "topk", "weighted", "sg", "random(sg)"}
    assert {m for i, m in rows if i == "reverse"} == want and {m for i, m in rows if i == "sort"} == want
    assert "nothing-to-score" not in {i for i, _ in rows}
    assert all("nll" in r for r in report["rows"])
    # the oracle is the "reverse" expert, and nearest retrieves the same one for its own description
    assert rows[("reverse", "oracle")]["score"] == rows[("reverse", "nearest")]["score"]
    assert rows[("reverse", "oracle")]["nll"] == pytest.approx(rows[("reverse", "nearest")]["nll"])
    assert rows[("reverse", "oracle")]["nll"] < rows[("reverse", "base")]["nll"]
    assert rows[("sort", "oracle")]["split"] == "train" and rows[("sort", "oracle")]["group"] == "strings"
    # the written sg adapter is what was scored: re-score it directly
    from loragen.batch.evaluate import read_adapter

    reg = Registry.open(world / "registry")
    sg = read_adapter(out / "adapters" / "reverse" / "sg", reg.spec)
    inst = [Instance(x, y) for x, y in zip(inputs, outputs)]
    direct = CausalGreedy(base).score([sg], [inst])[0]
    assert direct["score"] == rows[("reverse", "sg")]["score"]
    assert direct["nll"] == pytest.approx(rows[("reverse", "sg")]["nll"], rel=1e-5)
