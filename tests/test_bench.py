"""The decode benchmark: the naive loop matches the fused decoder; the CLI runs and fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS

from loragen.adapters import spec_from_config
from loragen.adapters.known_configs import KNOWN_CONFIGS, resolve_model_config
from loragen.adapters.spec import SpecError
from loragen.bench.decode import BenchError, build_generator, fused_decode, naive_decode, parse_batches

SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loragen.cli", "bench", "decode", *args], capture_output=True,
                          text=True, env=_env(), timeout=300)


@pytest.mark.parametrize("arch,targets", [("qwen2", ["q_proj", "v_proj", "down_proj"]), ("llama", ["q_proj", "v_proj"])])
def test_naive_matches_fused(arch, targets):
    spec = spec_from_config(TINY_CONFIGS[arch], targets=targets, rank=4)
    gen = build_generator(spec, hidden=32, latent=16, seed=3)
    text = torch.randn(3, 384)
    noise = torch.randn(1, 16)
    with torch.no_grad():
        fused = fused_decode(gen, text, noise)
    naive = naive_decode(gen, text, noise)
    assert set(fused) == set(naive) == set(spec.module_names)
    for m in spec.modules:
        assert fused[m.name].shape == naive[m.name].shape == (3, spec.num_layers, m.out_features, spec.rank)
        assert fused[m.name].abs().max() > 0
        torch.testing.assert_close(naive[m.name], fused[m.name], rtol=1e-5, atol=1e-6)
    # One request alone decodes to the same LoRA as inside the batch.
    with torch.no_grad():
        single = fused_decode(gen, text[1:2], noise)
    for m in spec.module_names:
        torch.testing.assert_close(single[m][0], fused[m][1], rtol=1e-5, atol=1e-6)


def test_known_configs(tmp_path):
    assert KNOWN_CONFIGS["llama-3-8b"]["num_key_value_heads"] == 8
    assert resolve_model_config("Qwen2.5-0.5B")["tie_word_embeddings"] is True
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_CONFIGS["mistral"]))
    assert resolve_model_config(tmp_path / "m")["hidden_size"] == 32
    assert resolve_model_config(str(tmp_path / "m" / "config.json"))["model_type"] == "mistral"
    with pytest.raises(SpecError, match="llama-3-8b"):
        resolve_model_config("gpt-9")
    assert parse_batches("1, 8,64") == [1, 8, 64]
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(BenchError):
            parse_batches(bad)


def test_cli_tiny(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIGS["qwen2"]))
    out = tmp_path / "bench.json"
    res = _cli("--model-config", str(config), "--rank", "4", "--targets", "q_proj,v_proj", "--batch", "1,2",
               "--repeats", "2", "--hidden", "32", "--latent", "16", "--naive-max", "1", "--registry-size", "20",
               "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "fused LoRA/s" in res.stdout
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert report["device"]["type"] == "cpu" and report["device"]["name"] and report["dtype"] == "float32"
    for row in report["results"]:
        assert row["fused"]["loras_per_s"] > 0 and row["naive"]["loras_per_s"] > 0 and row["speedup"] > 0
        assert row["naive"]["requests_timed"] == 1 and row["naive"]["extrapolated"] == (row["batch"] > 1)
        assert row["agreement"]["max_abs_diff"] <= 1e-5 * max(1.0, row["agreement"]["max_abs_value"])
        assert row["end_to_end"]["loras_per_s"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--model-config", "gpt-9"], "unknown model config"),
    (["--model-config", "qwen2.5-0.5b", "--batch", "1,x"], "--batch"),
    (["--model-config", "qwen2.5-0.5b", "--dtype", "bf16"], "fp32"),
    pytest.param(["--model-config", "qwen2.5-0.5b", "--device", "cuda"], "CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_cli_bad_inputs(args, needle):
    res = _cli(*args, "--no-end-to-end")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_compiled_decode_matches_eager(tmp_path):
    """--compile times torch.compile of the same decode (CUDA graphs on cuda) and checks it against eager."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIGS["llama"]))
    out = tmp_path / "bench.json"
    res = _cli("--model-config", str(config), "--rank", "4", "--batch", "2", "--repeats", "1", "--hidden", "32",
               "--latent", "16", "--naive-max", "1", "--no-end-to-end", "--compile", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "compiled ms" in res.stdout
    row = json.loads(out.read_text())["results"][0]
    assert row["compiled"]["mode"] == "default" and row["compiled"]["loras_per_s"] > 0
    assert row["compiled"]["max_abs_diff_vs_eager"] <= 1e-5 * max(1.0, row["agreement"]["max_abs_value"])


def test_a_compiler_failure_is_reported_not_fatal(monkeypatch):
    from loragen.cli.bench_cmds import table
    from loragen.bench import decode as bench

    def broken(*args, **kwargs):
        def fail(text):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(bench.torch, "compile", broken)
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4)
    cfg = bench.BenchConfig(batches=[1], repeats=1, hidden=16, latent=8, naive_max=1, end_to_end=False, compile=True)
    report = bench.run_benchmark(spec, cfg)
    row = report["results"][0]
    assert row["compiled"] == {"error": "RuntimeError: no compiler here"} and row["fused"]["loras_per_s"] > 0
    assert "torch.compile failed at batch 1: RuntimeError: no compiler here" in table(report)
