"""The SDK without a server: a torch-free import, the adapter files, the shared schemas; and the
API's cache and metrics, which stand on kept libraries."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loragen.client import AdapterFiles, Expert, ExpertPage, GenerationResult, ImportedExpert, Neighbour, SearchHit

SRC = Path(__file__).resolve().parents[1] / "src"

LORA_JSON = {"id": "lora-1", "method": "weighted", "description": "reverse", "base_model": "tiny", "rank": 4,
             "alpha": 8.0, "target_modules": ["q_proj"], "ood": False, "clipped": None, "seed": None,
             "sample_ids": ["lora-1"], "cached": False, "timings": {"total": 0.1},
             "neighbours": [{"expert": "rev", "expert_id": 1, "similarity": 0.9, "weight": 1.0}],
             "a_field_of_a_newer_server": 1}


def test_importing_the_sdk_does_not_import_torch() -> None:
    code = ("import loragen.client, sys; heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') "
            "if m in sys.modules); assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def adapter_zip(**extra: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("adapter_config.json", json.dumps({"r": 4, "peft_type": "LORA"}))
        zf.writestr("adapter_model.safetensors", b"weights")
        zf.writestr("loragen.json", json.dumps({"method": "weighted"}))
        for name, data in extra.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_adapter_files_are_the_peft_directory(tmp_path: Path) -> None:
    files = AdapterFiles.from_zip(io.BytesIO(adapter_zip(**{"../escape": b"x", "README.md": b"x"})))
    assert set(files.files) == {"adapter_config.json", "adapter_model.safetensors", "loragen.json"}
    assert files.config["r"] == 4 and files.weights == b"weights" and files.metadata == {"method": "weighted"}
    target = tmp_path / "out" / "adapter"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    assert files.save_pretrained(target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(files.files)  # replaced whole
    assert not (tmp_path / "escape").exists() and len(list((tmp_path / "out").iterdir())) == 1
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        AdapterFiles({"adapter_config.json": b"{}"})


def test_the_adapter_file_names_are_the_library_s() -> None:
    from loragen.adapters import lora
    from loragen.client import adapter

    assert (adapter.CONFIG_NAME, adapter.WEIGHTS_NAME) == (lora.CONFIG_NAME, lora.WEIGHTS_NAME)


def test_the_sdk_reads_the_api_s_own_response_models() -> None:
    from loragen import schemas
    from loragen.api import schemas as api_schemas
    from loragen.generator.example_evidence import EXAMPLES_FIT_THRESHOLD

    assert Neighbour is api_schemas.NeighbourOut and SearchHit is api_schemas.HitOut
    assert Expert is api_schemas.ExpertOut and ImportedExpert is api_schemas.ImportedExpertOut
    assert ExpertPage is api_schemas.ExpertList and issubclass(GenerationResult, api_schemas.LoraOut)
    assert schemas.EXAMPLES_FIT_THRESHOLD == EXAMPLES_FIT_THRESHOLD
    result = GenerationResult.from_json(LORA_JSON)  # unknown fields are ignored
    assert result.neighbours == [Neighbour(expert="rev", expert_id=1, similarity=0.9, weight=1.0)]
    assert result.adapter is None and result.lora is None
    with pytest.raises(ValueError, match="not downloaded"):
        result.save_pretrained("unused")


def test_byte_lru_lists_least_recent_first() -> None:
    from loragen.api.cache import ByteLRU

    cache: ByteLRU[str, int] = ByteLRU(100)
    for i, key in enumerate("abc"):
        cache.put(key, i, 30)
    cache.get("a")
    assert [k for k, _ in cache.items()] == ["b", "c", "a"] and (cache.hits, cache.misses) == (1, 0)
    cache.put("b", 9, 60)  # replaces b's 30 bytes, then evicts c (least recent) to fit
    assert [k for k, _ in cache.items()] == ["a", "b"] and cache.size == 90
    assert not cache.put("a", 0, 101) and "a" not in cache and cache.size == 60


def test_metrics_keep_their_series_in_each_app_s_own_registry() -> None:
    from loragen.api.cache import ByteLRU
    from loragen.api.metrics import Metrics

    cache: ByteLRU[str, int] = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.get("a")
    first, second = Metrics(cache), Metrics()
    first.request("GET", "/healthz", 200, 0.02)
    first.generation_batch(3)
    text = first.render()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['loragen_requests_total{method="GET",route="/healthz",status="200"}'] == "1.0"
    assert lines['loragen_request_seconds_bucket{le="0.025",route="/healthz"}'] == "1.0"
    assert lines['loragen_generation_batch_size_bucket{le="2.0"}'] == "0.0"
    assert lines["loragen_generated_loras_total"] == "3.0" and lines["loragen_cache_bytes"] == "40.0"
    assert lines["loragen_cache_hits_total"] == "1.0" and lines["loragen_cache_items"] == "1.0"
    types = {line.split(" ")[2]: line.split(" ")[3] for line in text.splitlines() if line.startswith("# TYPE")}
    assert types == {"loragen_requests_total": "counter", "loragen_request_seconds": "histogram",
                     "loragen_generation_batch_size": "histogram", "loragen_completion_batch_size": "histogram",
                     "loragen_generated_loras_total": "counter", "loragen_cache_hits_total": "counter",
                     "loragen_cache_misses_total": "counter", "loragen_cache_bytes": "gauge",
                     "loragen_cache_items": "gauge"}
    assert "_created" not in text and "/healthz" not in second.render()


def test_streamed_events_parse_into_chunks_and_errors() -> None:
    from loragen.client import ChatCompletionChunk, LoragenAPIError
    from loragen.client.streaming import _parse

    chunk = _parse('data: {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "delta": '
                   '{"content": "ab"}}], "a_field_of_a_newer_server": 1}', ChatCompletionChunk)
    assert isinstance(chunk, ChatCompletionChunk) and chunk.choices[0].delta.content == "ab"
    assert _parse("data: [DONE]", ChatCompletionChunk) is False
    assert _parse(": a comment", ChatCompletionChunk) is None and _parse("", ChatCompletionChunk) is None
    with pytest.raises(LoragenAPIError, match="base_model_unavailable: gone"):
        _parse('data: {"error": {"code": "base_model_unavailable", "message": "gone"}}', ChatCompletionChunk)
