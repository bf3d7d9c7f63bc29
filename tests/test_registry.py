from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS
from typer.testing import CliRunner

from loragen.adapters import Lora, spec_from_config
from loragen.embeddings.text import TextEncoder
from loragen.registry import Registry, RegistryError
from loragen.registry.index import VectorIndex

TASKS = {
    "sentiment": "classify the sentiment of movie reviews as positive or negative",
    "translate": "translate english sentences into french",
    "math": "solve grade school arithmetic word problems",
    "code": "write python functions from a docstring",
}
PARAPHRASES = {
    "sentiment": "decide whether a film review is favourable or not",
    "translate": "convert text from English to the French language",
    "math": "answer simple maths questions for children",
    "code": "generate Python code that implements a described function",
}
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "v_proj"], rank=4)


@pytest.fixture
def reg(tmp_path, spec, encoder) -> Registry:
    return Registry.create(tmp_path / "reg", spec, encoder=encoder)


def random_lora(spec, seed: int, rank: int = 4) -> Lora:
    g = torch.Generator().manual_seed(seed)
    s = spec.with_rank(rank, alpha=2 * rank)
    A = {m.name: torch.randn(s.num_layers, rank, m.in_features, generator=g) * 0.3 for m in s.modules}
    B = {m.name: torch.randn(s.num_layers, m.out_features, rank, generator=g) * 0.3 for m in s.modules}
    return Lora(s, A, B)


def random_b(reg: Registry, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in reg.basis.zeros_b().items()}


def snapshot(path: Path) -> tuple:
    """A logical picture of a registry: experts, descriptions, blobs on disk, basis."""
    r = Registry.open(path, encoder=None)
    experts = [(e.id, e.name, tuple(e.descriptions), tuple(e.checkpoints), e.fidelity) for e in r.experts()]
    blobs = sorted(p.name for p in (path / "blobs").iterdir())
    out = (experts, blobs, r.fingerprint(), sorted(r.index.ids().tolist()))
    r.close()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------- API


def test_add_get_list_remove(reg):
    ckpts = [random_b(reg, 0), random_b(reg, 1)]
    e = reg.add_expert("  first ", ckpts, ["a task", "the same task, said otherwise"],
                       metrics={"acc": 0.9}, tags=["demo"])
    assert e.name == "first" and e.descriptions == ["a task", "the same task, said otherwise"]
    assert len(e.checkpoints) == 2 and e.sha256 == e.checkpoints[-1]
    assert e.metrics == {"acc": 0.9} and e.tags == ["demo"] and e.source_sha256 is None
    assert reg.get("first") == reg.get(e.id) == reg.get(str(e.id)) == e
    for got, want in zip(reg.checkpoints(e), ckpts):
        assert all(torch.equal(got[k], want[k]) for k in want)
    lora = reg.lora("first")
    assert lora.metadata == {"expert": "first"}
    m = reg.spec.module_names[0]
    torch.testing.assert_close(lora.delta(m), reg.basis.lora(ckpts[-1]).delta(m))
    second = reg.add_expert("second", [random_b(reg, 2)], ["another task"])
    assert [x.name for x in reg.experts()] == ["first", "second"]
    before = reg.fingerprint()
    reg.remove("first")
    assert reg.fingerprint() != before
    assert [x.name for x in reg.experts()] == ["second"]
    assert sorted(reg.index.ids().tolist()) == sorted(reg.store.embeddings(reg.dim)[0].tolist())
    for sha in e.checkpoints:  # the removed expert's blobs are collected
        assert not (reg.path / "blobs" / f"{sha}.safetensors").exists()
    with pytest.raises(RegistryError, match="no expert"):
        reg.get("first")
    reopened = Registry.open(reg.path, encoder=reg.encoder)
    assert reopened.get(second.id) == second


def test_only_ascii_digits_are_ids(reg):
    """Other Unicode digits pass str.isdigit() but are names: "¹" made int() fail, "٣" read as 3."""
    for i in range(3):
        reg.add_expert(f"e{i + 1}", [random_b(reg, i)], [f"task {i}"])
    assert reg.get("3").name == reg.get(" 3 ").name == reg.get(3).name == "e3"
    for key in ["¹", "٣", "３", "9" * 5000, str(2**63), "-1"]:
        with pytest.raises(RegistryError, match="no expert"):
            reg.get(key)
    reg.add_expert("٣", [random_b(reg, 9)], ["named with an Arabic-Indic three"])
    assert reg.get("٣").name == "٣" and reg.get("٣").id == 4


@pytest.mark.parametrize(
    "name, descriptions, match",
    [("dup", ["x"], "already exists"), ("new", [], "at least one description"),
     ("new", ["ok", "   "], "empty description"), ("  ", ["x"], "non-empty name")],
)
def test_bad_input_leaves_the_registry_unchanged(reg, name, descriptions, match):
    reg.add_expert("dup", [random_b(reg, 0)], ["something"])
    before = snapshot(reg.path)
    with pytest.raises(RegistryError, match=match):
        reg.add_expert(name, [random_b(reg, 1)], descriptions)
    assert snapshot(reg.path) == before


def test_search_finds_the_expert_of_a_description(reg):
    for i, (name, text) in enumerate(TASKS.items()):
        reg.add_expert(name, [random_b(reg, i)], [text, f"{name} task number {i}"])
    names = list(TASKS)
    exact = reg.search(list(TASKS.values()), k=3)
    para = reg.search(list(PARAPHRASES.values()), k=3)
    for name, hits, phits in zip(names, exact, para):
        assert hits[0].name == name and hits[0].description == TASKS[name]
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
        assert phits[0].name == name
        assert len(hits) == 3 and len({h.expert_id for h in hits}) == 3  # one hit per expert
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert len(reg.search(["anything"], k=10)[0]) == len(TASKS)
    ids, vecs = reg.expert_embeddings()
    assert len(ids) == len(TASKS) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    for i, hits in enumerate(reg.search_vectors(vecs, k=1)):
        assert [h.expert_id for h in hits] == [ids[i]]


def test_tampered_blob_is_detected(reg):
    e = reg.add_expert("x", [random_b(reg, 0)], ["a task"])
    blob = reg.path / "blobs" / f"{e.sha256}.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="corrupt"):
        reg.checkpoints("x")
    with pytest.raises(RegistryError, match="corrupt"):
        reg.lora("x")


def test_a_different_encoder_is_refused(reg):
    other = TextEncoder("/models/some-other-encoder")  # never loaded: ids differ already
    with pytest.raises(RegistryError, match="some-other-encoder") as info:
        Registry.open(reg.path, encoder=other)
    assert "all-MiniLM-L6-v2" in str(info.value)
    with pytest.raises(RegistryError, match="no registry at"):
        Registry.open(reg.path / "missing")
    with pytest.raises(RegistryError, match="already exists"):
        Registry.create(reg.path, reg.spec, encoder=reg.encoder)


def test_import_reports_fidelity(reg, spec):
    foreign = random_lora(spec, seed=7)
    e, proj = reg.import_adapter(foreign, "foreign", ["a foreign adapter"])
    assert e.fidelity == pytest.approx(proj.fidelity) and proj.fidelity < 0.5
    assert e.source_sha256 is not None
    source = reg.source(e)
    assert source is not None and source.spec.alpha == foreign.spec.alpha
    assert all(torch.equal(source.A[m], foreign.A[m]) for m in spec.module_names)
    # An adapter whose A spans the basis' rows is represented exactly.
    g = torch.Generator().manual_seed(3)
    A = {m: torch.randn(spec.num_layers, 4, 4, generator=g) @ reg.basis.A[m] for m in spec.module_names}
    B = {m.name: torch.randn(spec.num_layers, m.out_features, 4, generator=g) for m in spec.modules}
    inside = Lora(spec.with_rank(4, alpha=5), A, B)
    e2, proj2 = reg.import_adapter(inside, "inside", ["an adapter in the basis"])
    assert proj2.fidelity == pytest.approx(1.0, abs=1e-5)
    for m in spec.module_names:
        assert rel_err(reg.lora(e2).delta(m), inside.delta(m)) < 1e-5
    other = spec_from_config({**TINY_CONFIGS["llama"], "num_hidden_layers": 3}, targets=["q_proj", "v_proj"], rank=4)
    before = snapshot(reg.path)
    with pytest.raises(RegistryError, match="does not match the base model"):
        reg.import_adapter(random_lora(other, seed=1), "wrong", ["wrong shapes"])
    assert snapshot(reg.path) == before


def test_rebase_at_the_sum_of_ranks_keeps_every_delta(reg, spec):
    foreign = {f"f{i}": random_lora(spec, seed=10 + i) for i in range(2)}
    for name, lora in foreign.items():
        reg.import_adapter(lora, name, [f"foreign task {name}"])
    native = [random_b(reg, 20), random_b(reg, 21)]
    reg.add_expert("native", native, ["a native expert"])
    native_deltas = [reg.basis.lora(b) for b in native]
    old_basis = reg.store.meta()["basis_sha256"]

    results = reg.rebase(12)  # 4 + 4 foreign + 4 for the native expert's span
    assert reg.spec.rank == 12 and reg.spec.alpha == 12
    assert {e.name for e, _ in results} == {"f0", "f1", "native"}
    assert all(f == pytest.approx(1.0, abs=1e-5) for _, f in results)
    reopened = Registry.open(reg.path, encoder=reg.encoder)
    assert reopened.spec.rank == 12 and reopened.basis.sha256() == reopened.store.meta()["basis_sha256"]
    assert not (reg.path / "blobs" / f"basis-{old_basis}.safetensors").exists()
    for name, lora in foreign.items():
        assert reopened.get(name).rank == 12
        for m in spec.module_names:
            assert rel_err(reopened.lora(name).delta(m), lora.delta(m)) < 1e-5
    ckpts = reopened.checkpoints("native")
    assert len(ckpts) == 2
    for got, want in zip(ckpts, native_deltas):
        for m in spec.module_names:
            assert rel_err(reopened.basis.lora(got).delta(m), want.delta(m)) < 1e-5


def test_a_failed_rebase_changes_nothing(reg, spec, monkeypatch):
    reg.import_adapter(random_lora(spec, seed=1), "a", ["task a"])
    before = snapshot(reg.path)
    delta = reg.lora("a").delta(spec.module_names[0])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash before the commit")

    monkeypatch.setattr(reg.store, "transaction", crash)
    with pytest.raises(KeyboardInterrupt):
        reg.rebase(8)
    after = snapshot(reg.path)
    assert after[0] == before[0] and after[2] == before[2]  # orphan blobs are allowed
    reopened = Registry.open(reg.path, encoder=reg.encoder)
    assert reopened.spec.rank == 4
    torch.testing.assert_close(reopened.lora("a").delta(spec.module_names[0]), delta)


def test_index_is_rebuilt_when_it_lags_behind_sqlite(reg, caplog):
    reg.add_expert("a", [random_b(reg, 0)], [TASKS["math"]])
    stale = VectorIndex(reg.dim)
    stale.save(reg.path / "index.faiss")  # as if the process died between commit and index write
    with caplog.at_level("WARNING"):
        reopened = Registry.open(reg.path, encoder=reg.encoder)
    assert "rebuilding" in caplog.text
    assert len(reopened.index) == 1 and reopened.search([TASKS["math"]], k=1)[0][0].name == "a"
    (reg.path / "index.faiss").write_bytes(b"garbage")
    assert len(Registry.open(reg.path, encoder=reg.encoder).index) == 1


def test_reindex_rewrites_every_embedding(reg):
    reg.add_expert("a", [random_b(reg, 0)], [TASKS["code"], TASKS["math"]])
    assert reg.reindex() == 2
    assert reg.search([TASKS["code"]], k=1)[0][0].similarity == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------------- CLI


def cli_env() -> dict[str, str]:
    # One thread: with tiny tensors on a shared, busy machine, OpenMP spinning costs 50x.
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_cli_happy_path(tmp_path, spec, encoder, monkeypatch):
    from loragen.cli import registry_cmds

    runner = CliRunner()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIGS["llama"]))
    monkeypatch.setattr("loragen.embeddings.text.TextEncoder._model", encoder._model, raising=False)
    r = str(tmp_path / "reg")
    res = runner.invoke(registry_cmds.app, ["init", r, "--base", str(config), "--targets", "q_proj,v_proj",
                                            "--rank", "4"], catch_exceptions=False)
    assert "created registry" in res.output
    adapters = tmp_path / "adapters"
    for i, (name, text) in enumerate(TASKS.items()):
        random_lora(spec, seed=i).save_pretrained(adapters / name)
    (adapters / "manifest.jsonl").write_text(
        "\n".join(json.dumps({"path": n, "descriptions": [t], "tags": ["t"]}) for n, t in list(TASKS.items())[1:]))
    res = runner.invoke(registry_cmds.app, ["add", str(adapters / "sentiment"), "-d", TASKS["sentiment"],
                                            "--registry", r], catch_exceptions=False)
    assert "added sentiment: fidelity" in res.output
    res = runner.invoke(registry_cmds.app, ["import", str(adapters), "--registry", r], catch_exceptions=False)
    assert res.output.count("added") == 3
    res = runner.invoke(registry_cmds.app, ["search", PARAPHRASES["math"], "-k", "2", "--registry", r],
                        catch_exceptions=False)
    first = res.output.splitlines()[0].split("\t")
    assert first[:2] == ["1", "math"] and first[3] == TASKS["math"] and len(first[2].split(".")[1]) == 3
    res = runner.invoke(registry_cmds.app, ["rebase", "--rank", "16", "--registry", r], catch_exceptions=False)
    assert res.output.count("fidelity 1.000") == 4
    res = runner.invoke(registry_cmds.app, ["rm", "code", "--registry", r], catch_exceptions=False)
    res = runner.invoke(registry_cmds.app, ["list", "--registry", r], catch_exceptions=False)
    assert "3 experts" in res.output and "code" not in res.output
    res = runner.invoke(registry_cmds.app, ["show", "math", "--registry", r], catch_exceptions=False)
    assert "rank: 16" in res.output and TASKS["math"] in res.output


def make_bad_inputs(root: Path, spec) -> dict[str, list[str]]:
    """Each bad input as the CLI arguments that should fail with one `error:` line."""
    good = root / "good"
    random_lora(spec, seed=1).save_pretrained(good)
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:200])
    other = spec_from_config({**TINY_CONFIGS["llama"], "num_hidden_layers": 3}, targets=["q_proj"], rank=4)
    wrong = root / "wrong"
    random_lora(other, seed=2).save_pretrained(wrong)
    return {
        "pickle": ["add", str(pickled), "-d", "x"],
        "corrupt": ["add", str(corrupt), "-d", "x"],
        "shape": ["add", str(wrong), "-d", "x"],
        "duplicate": ["add", str(good), "-d", "x", "--name", "taken"],
        "empty description": ["add", str(good), "-d", "   "],
    }


def test_cli_bad_inputs_fail_with_one_line_and_change_nothing(tmp_path, reg, spec):
    reg.import_adapter(random_lora(spec, seed=0), "taken", ["already here"])
    before = snapshot(reg.path)
    cases = make_bad_inputs(tmp_path, spec)
    cases["missing registry"] = ["list"]
    env = cli_env()
    procs = {}
    for case, args in cases.items():  # in parallel: each start pays for importing torch
        target = str(tmp_path / "nowhere") if case == "missing registry" else str(reg.path)
        procs[case] = subprocess.Popen([sys.executable, "-m", "loragen.cli", "registry", *args, "--registry", target],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    errors = {}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode != 0, case
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        errors[case] = lines[0]
    assert "pickle" in errors["pickle"] and "corrupt" in errors["corrupt"]
    assert "does not match" in errors["shape"] and "already exists" in errors["duplicate"]
    assert "empty description" in errors["empty description"] and "no registry" in errors["missing registry"]
    assert snapshot(reg.path) == before
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------- crash safety


def test_sigkilled_imports_leave_whole_experts_only(tmp_path, reg, spec):
    rng = random.Random(1234)
    env = cli_env()
    expected: dict[str, list[str]] = {}
    for rnd in range(3):
        batch = tmp_path / f"batch{rnd}"
        lines = []
        for i in range(40):
            name = f"r{rnd}-{i:02d}"
            random_lora(spec, seed=100 * rnd + i).save_pretrained(batch / name)
            descs = [f"task {name}: variant {j} of the job" for j in range(1 + i % 3)]
            expected[name] = descs
            lines.append(json.dumps({"path": name, "name": name, "descriptions": descs}))
        (batch / "manifest.jsonl").write_text("\n".join(lines))
        proc = subprocess.Popen([sys.executable, "-m", "loragen.cli", "registry", "import", str(batch),
                                 "--registry", str(reg.path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        assert proc.stdout is not None
        wait_for = rng.randrange(1, 39)  # kill somewhere inside the import loop
        for _ in range(wait_for):
            assert proc.stdout.readline().startswith("added"), "the import ended early"
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        r = Registry.open(reg.path, encoder=reg.encoder)
        experts = r.experts()
        names = [e.name for e in experts if e.name.startswith(f"r{rnd}-")]
        assert len(names) >= wait_for
        assert names == sorted(names) and names == [f"r{rnd}-{i:02d}" for i in range(len(names))]
        for e in experts:  # whole experts only, every blob intact
            assert e.descriptions == expected[e.name]
            assert len(e.checkpoints) == 1 and len(r.checkpoints(e)) == 1
            assert r.source(e) is not None
        ids = r.store.embeddings(r.dim)[0]
        assert sorted(r.index.ids().tolist()) == ids.tolist()
        last = names[-1]
        assert r.search([expected[last][0]], k=1)[0][0].name == last
        r.close()


def test_encoder_workers_split_a_batch_without_changing_it(encoder):
    """Split across single-threaded workers, the rows come back in order and equal to one call's."""
    import threading

    texts = [f"description number {i} of a task with {'many ' * (i % 5)}words" for i in range(13)]
    split = encoder.with_options(workers=3)
    assert split.workers == 3 and encoder.workers == 1 and split._model is encoder._model
    np.testing.assert_allclose(split.encode(texts), encoder.encode(texts), atol=1e-6, rtol=0)
    assert any(t.name.startswith("loragen-encoder") for t in threading.enumerate())
    assert split.encode(texts[:2]).shape == (2, encoder.dim)  # too few texts to split: one call
    # The workers' single thread does not leak into threads started afterwards.
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [torch.get_num_threads()]


def test_packed_encoder_matches_sentence_transformers(encoder):
    """The padding-free forward gives the library's own embeddings: float32 to 1e-6, in order, for
    texts of every length (a truncated one included), whatever the chunking."""
    from loragen.embeddings import packed as packed_module
    from loragen.embeddings.packed import PackedBert

    assert PackedBert.supports(encoder._model)
    assert isinstance(packed_module._forward, torch.jit.ScriptFunction)  # runs without the GIL
    texts = ["x", "reverse the input string", "Ünïcode — émoji 🎉 text", "word " * 400,
             *[f"task {i}: {'shift the letters ' * (i % 4)}by {i}" for i in range(11)]]
    reference = TextEncoder(encoder._source, packed=False, batch_size=64)
    reference.__dict__["_model"] = encoder._model
    expected = reference.encode(texts)
    packed = encoder.with_options()
    packed.batch_size = 4  # several chunks, each sorted by length
    got = packed.encode(texts)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # bf16 matrix products: not bit-equal, but the same direction to 1e-4.
    bf16 = encoder.with_options(compute_dtype="bfloat16").encode(texts)
    assert (bf16 * expected).sum(axis=1).min() > 0.9999


def test_packed_encoder_falls_back_for_other_poolings(encoder):
    """A model this forward does not cover (CLS pooling here) goes through sentence-transformers."""
    from sentence_transformers import SentenceTransformer, models

    from loragen.embeddings.packed import PackedBert

    cls = SentenceTransformer(modules=[encoder._model[0], models.Pooling(encoder.dim, pooling_mode="cls")])
    assert not PackedBert.supports(cls)
    other = TextEncoder(encoder._source)
    other.__dict__["_model"] = cls
    texts = ["reverse the input string", "sort the characters"]
    expected = cls.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(other.encode(texts), expected, atol=1e-6, rtol=0)
    assert other._packed() is None


def test_auto_encoder_dtype_follows_the_hardware(monkeypatch):
    from loragen.api import ApiSettings
    from loragen.embeddings import resolve_dtype

    assert ApiSettings().encoder_dtype == "auto"
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_dtype("auto") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_dtype("fp8")


def test_small_searches_run_on_one_thread_with_the_same_results(monkeypatch):
    import faiss

    from loragen.registry import index as index_module

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    index = VectorIndex.build(16, np.arange(300), vecs)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    threads = faiss.omp_get_max_threads()
    seen = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (seen.append(n), real(n)))
    small = index.search(queries, 5)
    assert seen == [1, threads] and faiss.omp_get_max_threads() == threads
    monkeypatch.setattr(index_module, "SINGLE_THREAD_PRODUCTS", 0)
    large = index.search(queries, 5)
    assert seen == [1, threads]
    np.testing.assert_array_equal(small[1], large[1])
    np.testing.assert_allclose(small[0], large[0], rtol=1e-6)
