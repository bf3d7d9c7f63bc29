"""One registry, many processes: two writer processes add experts at once while this process
searches the same registry through one long-lived handle."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS

from loragen.adapters import spec_from_config
from loragen.registry import Registry
from loragen.registry.index import VectorIndex, gpu_unavailable

WRITER = """
import sys, torch
from loragen.registry import Registry
reg = Registry.open(sys.argv[1])
tag, n = sys.argv[2], int(sys.argv[3])
g = torch.Generator().manual_seed(len(tag))
for i in range(n):
    cps = [{m: torch.randn(b.shape, generator=g) for m, b in reg.basis.zeros_b().items()} for _ in range(2)]
    reg.add_expert(f"{tag}-{i}", cps, [f"{tag} task number {i}", f"another way to say {tag} {i}"])
print("done", flush=True)
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def _check_whole(reg: Registry, hits: list) -> None:
    for hit in hits:
        expert = reg.get(hit.expert_id)  # every hit names an expert SQLite has, whole
        assert hit.description in expert.descriptions and len(expert.checkpoints) == 2
        assert set(reg.final_b(expert)) == set(reg.spec.module_names)


def test_two_writer_processes_and_a_reader(tmp_path, encoder):
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "v_proj"], rank=4)
    reader = Registry.create(tmp_path / "reg", spec, encoder=encoder)
    n = 6
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "reg"), tag, str(n)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for tag in ("alpha", "beta")]
    deadline = time.monotonic() + 300
    while any(w.poll() is None for w in writers):  # search while they write
        assert time.monotonic() < deadline
        hits = reader.search(["alpha task number 3", "another way to say beta 1"], k=20)
        for h in hits:
            _check_whole(reader, h)
        time.sleep(0.2)
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0 and "done" in out, err[-2000:]
    experts = reader.experts()
    assert sorted(e.name for e in experts) == sorted(f"{t}-{i}" for t in ("alpha", "beta") for i in range(n))
    for e in experts:
        assert set(reader.final_b(e)) == set(spec.module_names) and len(e.descriptions) == 2
    # the long-lived handle follows both writers without reopening; the saved index has all of them
    hits = reader.search(["alpha task number 3", "beta task number 5"], k=2 * n)
    assert len(hits[0]) == len(hits[1]) == 2 * n and hits[0][0].name == "alpha-3" and hits[1][0].name == "beta-5"
    _check_whole(reader, hits[0])
    ids = np.sort(reader.store.description_ids())
    assert len(ids) == 4 * n and np.array_equal(np.sort(reader.index.ids()), ids)
    saved = VectorIndex.load(tmp_path / "reg" / "index.faiss", reader.dim)
    assert saved is not None and np.array_equal(np.sort(saved.ids()), ids)
    fresh = Registry.open(tmp_path / "reg", encoder=encoder)
    assert [(h.name, h.description) for h in fresh.search(["beta task number 5"], k=3)[0]] == \
        [(h.name, h.description) for h in reader.search(["beta task number 5"], k=3)[0]]


def test_a_read_only_handle_refuses_writes_and_follows_a_writer(tmp_path, encoder):
    from loragen.errors import ReadOnlyError

    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "v_proj"], rank=4)
    writer = Registry.create(tmp_path / "reg", spec, encoder=encoder)
    cps = [{m: torch.ones_like(b) for m, b in writer.basis.zeros_b().items()}]
    writer.add_expert("first", cps, ["count the vowels in a word"])
    reader = Registry.open(tmp_path / "reg", encoder=encoder, read_only=True)
    before = sorted(p.name for p in (tmp_path / "reg").rglob("*"))
    for write in (lambda: reader.add_expert("second", cps, ["reverse a word"]), lambda: reader.remove("first"),
                  reader.reindex):
        with pytest.raises(ReadOnlyError, match="read-only"):
            write()
    with pytest.raises(Exception, match="readonly"):  # SQLite's own mode refuses too, under the lock
        reader.store.set_meta("x", "y")
    assert sorted(p.name for p in (tmp_path / "reg").rglob("*")) == before
    assert [e.name for e in reader.experts()] == ["first"]
    writer.add_expert("second", cps, ["reverse a word"])  # another handle writes; the read-only one sees it
    assert reader.search(["reverse a word"], k=1)[0][0].name == "second"


def test_faiss_on_cuda_without_a_gpu_build_stays_on_the_cpu_with_one_log_line(tmp_path, encoder, caplog):
    if gpu_unavailable("cuda") is None:
        pytest.skip("faiss has a GPU here: test_gpu_faiss_gives_the_cpu_neighbours covers it")
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "v_proj"], rank=4)
    reg = Registry.create(tmp_path / "reg", spec, encoder=encoder)
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        reg.add_expert(f"e{i}", [{m: torch.randn(b.shape, generator=g) for m, b in reg.basis.zeros_b().items()}],
                       [f"task number {i}"])
    with caplog.at_level("WARNING", logger="loragen.registry.index"):
        on_cuda = Registry.open(tmp_path / "reg", encoder=encoder, device="cuda")
        queries = ["task number 3", "something else"]
        assert on_cuda.search(queries, k=3) == reg.search(queries, k=3)
        on_cuda.reindex()
    lines = [r.getMessage() for r in caplog.records if r.name == "loragen.registry.index"]
    assert len(lines) == 1 and lines[0].startswith("FAISS index stays on the CPU: ")
    assert on_cuda.device == "cpu" and on_cuda.index.device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(gpu_unavailable("cuda") is not None, reason="needs faiss's GPU build and a CUDA GPU")
@pytest.mark.parametrize("n", [10**5, 10**6])
def test_gpu_faiss_gives_the_cpu_neighbours(n):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 384), dtype=np.float32)
    queries = rng.standard_normal((256, 384), dtype=np.float32)
    cpu = VectorIndex.build(384, np.arange(n, dtype=np.int64), vecs)
    gpu = VectorIndex.build(384, np.arange(n, dtype=np.int64), vecs).to("cuda")
    assert gpu.device == "cuda"
    gpu.search(queries[:1], 10)  # the copy to the GPU is made once, outside the timing
    timings = {}
    for name, index in (("cpu", cpu), ("gpu", gpu)):
        started = time.perf_counter()
        sims, ids = index.search(queries, 10)
        timings[name] = time.perf_counter() - started
        if name == "cpu":
            want_sims, want_ids = sims, ids
    print(f"\n{n} vectors, 256 queries, k=10: cpu {timings['cpu'] * 1e3:.1f} ms, gpu {timings['gpu'] * 1e3:.1f} ms")
    np.testing.assert_allclose(sims, want_sims, atol=1e-4)
    assert (ids == want_ids).mean() > 0.999  # ties in float32 may swap places
