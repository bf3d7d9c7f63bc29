"""One registry, many processes: two writer processes add experts at once while this process
searches the same registry through one long-lived handle."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import TINY_CONFIGS

from loragen.adapters import spec_from_config
from loragen.registry import Registry
from loragen.registry.index import VectorIndex

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
