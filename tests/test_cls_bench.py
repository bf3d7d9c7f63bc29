"""`loragen bench cls` end to end on a small task file of its own (real MiniLM, few steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import pytest

from loragen.bench.cls import ClsBenchConfig, ClsBenchError, run_cls_bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ClsBenchConfig(steps=6, rows_per_task=2, checkpoints=2, generator_epochs=2, latent=16, task_steps=2,
                      multitask_steps=2, examples_per_request=(4,), train_controls=True)
GENERATORS = ("icm:reconstruction", "sg:reconstruction", "icm:task", "sg:task")


def _toy_tasks(path: Path, keep: int = 24) -> list[dict]:
    spec = importlib.util.spec_from_file_location("toy_cls_tasks", ROOT / "benchmarks" / "toy_cls_tasks.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    tasks = [t for t in module.tasks() if t["task"] in {"parity_number", "colour_word", "object_kind",
                                                        "verb_tense", "produce_kind"}]
    for t in tasks:
        t["instances"] = t["instances"][:keep]
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return tasks


def test_bench_cls_runs_on_another_file_and_reuses_its_experts(tmp_path):
    data = tmp_path / "toy.jsonl"
    tasks = _toy_tasks(data)
    logs: list[str] = []
    bench = run_cls_bench(data, tmp_path / "out", TINY, log=logs.append)
    for name in ("report.json", "report.md", "report.png", "bench.json", "transfer.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # Its numbers come from this file only: the items are its tasks, split as the file says.
    splits = {(r["item"], r["split"]) for r in report["rows"]}
    assert splits == {(t["task"], "heldout" if t["split"] == "heldout" else "train") for t in tasks}
    methods = {r["method"] for r in report["rows"]}
    controls = {f"{c}({g})" for g in (*GENERATORS, "weighted") for c in ("mismatched", "random")} - {"random(weighted)"}
    assert methods == {"base", "oracle", "uniform", "nearest", "topk", "weighted", "multitask", *GENERATORS,
                       *controls, "icm:reconstruction+4 examples"}
    # One held-out task has no other to mismatch with: the controls run on the train tasks only.
    assert not {r["method"] for r in report["rows"] if r["split"] == "heldout"} & controls
    train = bench["transfer"]["train"]
    assert set(train["sg:task"]) >= {"share", "share_ci", "over_multitask", "description_effect"}
    assert train["sg:task"]["mean_ci"][0] <= train["sg:task"]["mean"] <= train["sg:task"]["mean_ci"][1]
    assert all(0.0 <= r["score"] <= 1.0 for r in report["rows"])
    assert bench["tasks"] == {"train": 4, "heldout": 1}
    # The held-out task's expert is an oracle only: never in the registry the generators train on.
    assert report["summary"]["heldout"]["oracle"]["n"] == 1
    from loragen.registry import Registry

    cache = Path(bench["expert_cache"])
    assert "produce_kind" not in {e.name for e in Registry.open(cache / "registry").experts()}
    assert {e.name for e in Registry.open(cache / "oracle").experts()} == {"produce_kind"}

    # Again into the same OUT: experts and generators are reused, with the same scores.
    logs.clear()
    again = run_cls_bench(data, tmp_path / "out", TINY, cache=cache.parent, log=logs.append)
    assert any("experts: cached" in line for line in logs) and again["expert_cache"] == bench["expert_cache"]
    assert {f"{g}: cached" for g in GENERATORS} <= {line.split(" in ")[0] for line in logs}
    assert again["summary"] == bench["summary"]
    # A changed training setting trains the generator again.
    logs.clear()
    run_cls_bench(data, tmp_path / "out", replace(TINY, task_steps=3, generators=("sg:task",), examples_per_request=()),
                  cache=cache.parent, log=logs.append)
    assert any(line.startswith("sg:task: trained") for line in logs)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ClsBenchError, match="no data at"):
        run_cls_bench(tmp_path / "missing", tmp_path / "out", TINY)
    data = tmp_path / "nolabels.jsonl"
    data.write_text(json.dumps({"task": "t", "definition": "d", "split": "train",
                                "instances": [{"input": "a", "output": "x"}, {"input": "b", "output": "y"}]}) + "\n")
    with pytest.raises(ClsBenchError, match="needs 'labels'"):
        run_cls_bench(data, tmp_path / "out", TINY)


@pytest.mark.parametrize("extra, message", [([], "no data at"), (["--device", "tpu"], "unknown device")])
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, "-m", "loragen.cli", "bench", "cls", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
