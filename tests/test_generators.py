"""ICM-LoRA / SG-LoRA generators on a tiny registry of synthetic experts (a few dozen steps each)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import TARGETS, TINY_CONFIGS

from loragen.adapters import Basis, spec_from_config
from loragen.generator import GenerationError, LearnedGenerator, RetrievalGenerator, load_generator, train_generator
from loragen.generator.decoder import TokenDecoder, TokenLayout
from loragen.generator.description_head import HeadConfig
from loragen.registry import Registry

TASKS = {
    "reverse": ["reverse the string", "write the letters backwards"],
    "upper": ["make every letter uppercase", "capitalise all characters"],
    "sort": ["sort the letters alphabetically", "put the characters in order"],
    "double": ["repeat every letter twice", "double each character"],
    "vowels": ["remove the vowels", "delete a, e, i, o and u"],
    "count": ["count the letters", "say how many characters there are"],
}
TRAIN = dict(epochs=3, batch=4, latent=16, hidden=64, lr=3e-3, val_fraction=0.2, patience=10)


def _spec(rank: int = 4):
    return spec_from_config(TINY_CONFIGS["llama"], targets=TARGETS["llama"], rank=rank, base_model="tiny-llama")


def _registry(path, encoder, *, seed: int = 0, rank: int = 4) -> Registry:
    spec = _spec(rank)
    reg = Registry.create(path, spec, encoder=encoder, seed=seed)
    gen = torch.Generator().manual_seed(1)
    for name, descriptions in TASKS.items():
        centre = {m.name: torch.randn(spec.num_layers, m.out_features, spec.rank, generator=gen) for m in spec.modules}
        cps = [{m: c + 0.05 * torch.randn(c.shape, generator=gen) for m, c in centre.items()} for _ in range(3)]
        reg.add_expert(name, cps, descriptions)
    return reg


@pytest.fixture(scope="module")
def registry(tmp_path_factory, encoder) -> Registry:
    return _registry(tmp_path_factory.mktemp("gen") / "registry", encoder)


@pytest.fixture(scope="module", params=["icm", "sg"])
def trained(request, registry, tmp_path_factory) -> tuple[LearnedGenerator, object]:
    out = tmp_path_factory.mktemp(request.param) / "generator"
    return train_generator(registry, request.param, seed=0, out_dir=out, **TRAIN), out


def _same(a, b, atol: float = 0.0) -> bool:
    return all(torch.allclose(a.B[m], b.B[m], atol=atol, rtol=0) for m in a.B)


def test_shapes_dtype_and_metadata(trained, registry):
    gen, _ = trained
    lora = gen.generate(["reverse the letters of the input"], seed=0)[0]
    spec = registry.spec
    for m in spec.modules:
        assert lora.B[m.name].shape == (spec.num_layers, m.out_features, spec.rank)
        assert lora.B[m.name].dtype == torch.float32
        assert torch.equal(lora.A[m.name], registry.basis.A[m.name])
    meta = lora.metadata
    assert meta["method"] == gen.method and meta["neighbours"][0]["expert"] == "reverse"
    assert {"ood", "clipped", "nearest_similarity", "seed"} <= set(meta)
    assert sum(n["weight"] for n in meta["neighbours"]) == pytest.approx(1.0, abs=1e-5)
    assert meta["ambiguous"] == (max(n["weight"] for n in meta["neighbours"]) < 0.9)


def test_ambiguous_when_no_expert_holds_nine_tenths_of_the_weight(registry):
    from loragen.generator.retrieval import Neighbour, ambiguous

    weights = lambda *ws: [Neighbour(f"e{i}", i, 0.5, w) for i, w in enumerate(ws)]  # noqa: E731
    assert ambiguous(weights(0.5, 0.5)) and ambiguous(weights(0.89, 0.11))
    assert not ambiguous(weights(0.9, 0.1)) and not ambiguous(weights(1.0)) and not ambiguous([])
    # a hot softmax spreads the weight over the top-K experts; nearest takes one; uniform mixes by design
    hot, = RetrievalGenerator(registry, "weighted", temperature=100.0).generate(["reverse the string"])
    one, = RetrievalGenerator(registry, "nearest").generate(["reverse the string"])
    flat, = RetrievalGenerator(registry, "uniform").generate(["reverse the string"])
    assert (hot.metadata["ambiguous"], one.metadata["ambiguous"], flat.metadata["ambiguous"]) == (True, False, None)


def test_seed_determinism_and_samples(trained):
    gen, _ = trained
    a = gen.generate(["sort the letters"], seed=3)[0]
    b = gen.generate(["sort the letters"], seed=3)[0]
    c = gen.generate(["sort the letters"], seed=4)[0]
    assert _same(a, b) and not _same(c, a)
    samples = gen.generate(["sort the letters"], seed=3, num_samples=3)
    assert len(samples) == 3 and _same(samples[0], a, atol=1e-6)
    assert not _same(samples[0], samples[1]) and not _same(samples[1], samples[2])


def test_batch_equals_single_calls(trained):
    gen, _ = trained
    descriptions = ["uppercase everything", "drop the vowels", "a task about cooking pasta"]
    batch = gen.generate(descriptions, seed=11, num_samples=2)
    for i, d in enumerate(descriptions):
        single = gen.generate([d], seed=11, num_samples=2)
        for s in range(2):
            assert _same(batch[2 * i + s], single[s], atol=1e-5)
            assert batch[2 * i + s].metadata["description"] == d


def test_save_load_roundtrip_and_dtype(trained, registry):
    gen, out = trained
    loaded = load_generator(gen.method, registry, generator_dir=out)
    a = gen.generate(["double each letter"], seed=5)[0]
    b = loaded.generate(["double each letter"], seed=5)[0]
    assert _same(a, b)
    half = LearnedGenerator.from_pretrained(out, registry, dtype=torch.bfloat16)
    c = half.generate(["double each letter"], seed=5)[0]
    assert c.dtype == torch.bfloat16
    rel = max(float((c.B[m].float() - a.B[m]).norm() / a.B[m].norm()) for m in a.B)
    assert rel < 0.1


def _version_1(config: dict) -> dict:
    """A config.json in the flat layout written before the settings were typed."""
    new = dict(config)
    settings = new.pop("generator")
    old = {"format": new.pop("format"), "version": 1, "method": settings["method"], **new, "holdout": settings["holdout"]}
    return {k: v for k, v in old.items() if not (k in ("objective", "task_training") and v is None)}


def test_a_version_1_checkpoint_loads_and_generates_the_same(trained, registry, tmp_path):
    gen, out = trained
    saved = json.loads((out / "config.json").read_text())
    assert saved["version"] == 2 and saved["generator"]["method"] == gen.method
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    (old / "config.json").write_text(json.dumps(_version_1(saved)))
    loaded = LearnedGenerator.from_pretrained(old, registry)
    assert loaded.config.cvae == gen.config.cvae and loaded.config.training == gen.config.training
    settings, want = loaded.config.generator, gen.config.generator
    for name in ("method", "holdout", "latent", "hidden", "top_k", "temperature", "epochs", "lr", "batch", "seed",
                 "val_fraction", "patience", "description_head", "description_encoder", "residual"):
        assert getattr(settings, name) == getattr(want, name), name
    a = gen.generate(["double each letter", "sort them"], seed=5, num_samples=2)
    b = loaded.generate(["double each letter", "sort them"], seed=5, num_samples=2)
    assert all(torch.equal(x.B[m], y.B[m]) for x, y in zip(a, b) for m in x.B)
    assert [x.metadata for x in a] == [y.metadata for y in b]
    loaded.save_pretrained(tmp_path / "v2")  # saving again writes the current layout
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["version"] == 2


def test_generator_config_is_typed_and_documented(registry):
    from loragen.generator import GeneratorConfig
    from loragen.generator.training import settings

    assert all(f.metadata.get("help") for f in dataclasses.fields(GeneratorConfig))
    with pytest.raises(GenerationError, match="unknown learned method"):
        GeneratorConfig(method="vae")
    with pytest.raises(GenerationError, match="task loss only"):
        GeneratorConfig(residual=True)
    with pytest.raises(TypeError, match="unknown generator settings: epoch"):
        settings("icm", epoch=3)
    cfg = settings("sg", GeneratorConfig(latent=8, holdout=("b", "a")), epochs=0)
    assert (cfg.method, cfg.latent, cfg.epochs, cfg.holdout, cfg.kl(), cfg.prior()) == ("sg", 8, 0, ["a", "b"], 1.0, 0.0)
    light = {**TRAIN, "epochs": 1, "seed": 2, "description_encoder": False}
    by_name = train_generator(registry, "icm", **light)
    by_config = train_generator(registry, config=GeneratorConfig(method="icm", **light))
    assert by_name.config == by_config.config
    assert _same(by_name.generate(["sort the letters"], seed=1)[0], by_config.generate(["sort the letters"], seed=1)[0])


def test_wrong_registry_is_rejected(trained, tmp_path, encoder):
    _, out = trained
    other_basis = _registry(tmp_path / "basis", encoder, seed=7)
    with pytest.raises(GenerationError, match="basis"):
        LearnedGenerator.from_pretrained(out, other_basis)
    other_rank = _registry(tmp_path / "rank", encoder, rank=2)
    with pytest.raises(GenerationError, match="rank"):
        LearnedGenerator.from_pretrained(out, other_rank)
    with pytest.raises(GenerationError, match="not a loragen generator"):
        LearnedGenerator.from_pretrained(tmp_path, other_rank)


def test_missing_generator_dir_is_a_clear_error(registry):
    with pytest.raises(GenerationError, match="needs a trained generator"):
        load_generator("sg", registry)


def test_nan_in_decoder_raises(trained, registry):
    _, out = trained
    gen = LearnedGenerator.from_pretrained(out, registry)
    with torch.no_grad():
        gen.model.decoder.heads[0].weight[0, 0] = float("nan")
    with pytest.raises(GenerationError, match="non-finite"):
        gen.generate(["reverse the string"], seed=0)


def test_clipping_keeps_norms_in_range(trained, registry):
    _, out = trained
    gen = LearnedGenerator.from_pretrained(out, registry)
    gen.safety = dataclasses.replace(gen.safety, norm_max={m: v * 0.5 for m, v in gen.safety.norm_max.items()},
                                     norm_min={m: v * 0.25 for m, v in gen.safety.norm_min.items()})
    lora = gen.generate(["reverse the string"], seed=0)[0]
    assert lora.metadata["clipped"]
    for m, b in lora.B.items():
        norms = b.flatten(1).norm(dim=1)
        assert torch.all(norms <= gen.safety.norm_max[m] * (1 + 1e-4))
        assert torch.all(norms >= gen.safety.norm_min[m] * (1 - 1e-4))


def test_ood_flag(trained):
    gen, _ = trained
    near, far = gen.generate(["reverse the string", "quarterly tax filing for a bakery in Lyon"], seed=0)
    assert not near.metadata["ood"]
    assert far.metadata["nearest_similarity"] < near.metadata["nearest_similarity"]


def test_holdout_experts_are_never_neighbours(registry):
    gen = train_generator(registry, "sg", holdout=["reverse"], **{**TRAIN, "epochs": 1})
    lora = gen.generate(["reverse the string"], seed=0)[0]
    assert "reverse" not in {n["expert"] for n in lora.metadata["neighbours"]}
    assert gen.config.generator.holdout == ["reverse"]


def test_training_is_deterministic_and_resumable(registry, tmp_path):
    a = train_generator(registry, "icm", seed=1, **{**TRAIN, "epochs": 1})
    b = train_generator(registry, "icm", seed=1, **{**TRAIN, "epochs": 1}, out_dir=tmp_path / "g")
    assert _same(a.generate(["sort"], seed=0)[0], b.generate(["sort"], seed=0)[0])
    c = train_generator(registry, "icm", seed=1, **{**TRAIN, "epochs": 1}, out_dir=tmp_path / "g", resume=True)
    assert c.config.training["epochs"] == 1
    d = train_generator(registry, "icm", seed=1, **{**TRAIN, "epochs": 2}, out_dir=tmp_path / "g", resume=True)
    history = d.config.training["history"]
    assert d.config.training["epochs"] == 2 and len(history) == 2  # one more epoch on the saved one
    assert history[0] == b.config.training["history"][0]
    with pytest.raises(GenerationError, match="cannot resume .* 'icm' generator's, not 'sg'"):
        train_generator(registry, "sg", seed=1, **{**TRAIN, "epochs": 2}, out_dir=tmp_path / "g", resume=True)


def test_train_cli_never_replaces_a_generator_by_accident(tmp_path):
    from loragen.cli.generate_cmds import _check_generator_out

    fresh, empty, trained, other = tmp_path / "new", tmp_path / "empty", tmp_path / "icm", tmp_path / "reg"
    empty.mkdir(), trained.mkdir(), other.mkdir()
    (trained / "config.json").write_text('{"method": "icm"}')
    (trained / "model.safetensors").write_bytes(b"")
    (trained / "description_vectors.safetensors").write_bytes(b"")  # a tuned encoder's, saved beside it
    (other / "registry.sqlite").write_bytes(b"")
    for out in (fresh, empty):
        _check_generator_out(out, "icm", resume=False, overwrite=False)
    _check_generator_out(trained, "icm", resume=True, overwrite=False)
    _check_generator_out(trained, "icm", resume=False, overwrite=True)
    with pytest.raises(GenerationError, match="--resume continues it, --overwrite replaces it"):
        _check_generator_out(trained, "icm", resume=False, overwrite=False)
    with pytest.raises(GenerationError, match="holds a generator of method 'icm', not 'sg'"):
        _check_generator_out(trained, "sg", resume=False, overwrite=True)
    with pytest.raises(GenerationError, match="not a generator's"):
        _check_generator_out(other, "icm", resume=False, overwrite=True)


def test_decoder_has_no_layer_loop():
    """The same code decodes 2- and 4-layer specs; the output is laid out per module as (N, L, out, r)."""
    for layers in (2, 4):
        spec = spec_from_config({**TINY_CONFIGS["llama"], "num_hidden_layers": layers}, targets=TARGETS["llama"], rank=4)
        layout = TokenLayout(spec)
        decoder = TokenDecoder(layout, request_dim=8, hidden=16)
        out = layout.to_modules(decoder(torch.randn(3, 8)))
        for m in spec.modules:
            assert out[m.name].shape == (3, layers, m.out_features, 4)
        B = {m.name: torch.randn(3, layers, m.out_features, 4) for m in spec.modules}
        back = layout.to_modules(layout.to_groups(B))
        assert all(torch.equal(back[m], B[m]) for m in B)
    assert Basis.seeded(spec).spec is spec


def test_topk_is_the_equal_mean_of_the_top_k_experts(registry):
    """topk: weight 1/K on each of the K nearest experts (the same ones `weighted` picks), 0 elsewhere."""
    from loragen.generator import RetrievalGenerator

    description = "write the letters backwards"
    lora = load_generator("topk", registry, k=3).generate([description])[0]
    neighbours = lora.metadata["neighbours"]
    assert [n["weight"] for n in neighbours] == pytest.approx([1 / 3] * 3)
    weighted = RetrievalGenerator(registry, "weighted", k=3).generate([description])[0]
    assert [n["expert"] for n in neighbours] == [n["expert"] for n in weighted.metadata["neighbours"]]
    assert neighbours[0]["expert"] == "reverse"
    for m in registry.spec.module_names:
        want = sum(registry.final_b(n["expert"])[m] for n in neighbours) / 3
        torch.testing.assert_close(lora.B[m], want, rtol=1e-5, atol=1e-6)
    # Softmax weighting at a small τ is not the equal mean.
    assert not all(torch.allclose(lora.B[m], weighted.B[m]) for m in lora.B)


@pytest.mark.parametrize("method", ["weighted", "topk", "nearest", "uniform"])
def test_retrieval_mix_is_the_weighted_sum_and_batch_invariant(registry, method):
    from loragen.generator import RetrievalGenerator

    gen = RetrievalGenerator(registry, method, k=3)
    w, _ = gen.weights(gen._search(["write the letters backwards", "count them", "sort the letters"]))
    stacked = gen._experts[2]
    for m, b in stacked.items():
        mixed = gen.mix(w, b)
        want = torch.einsum("ne,elor->nlor", w, b.double())
        torch.testing.assert_close(mixed.double(), want, rtol=0, atol=1e-6)
        for i in range(len(w)):  # a row of a batch is bitwise its single call
            assert torch.equal(mixed[i], gen.mix(w[i : i + 1], b)[0])


# ------------------------------------------------------------------ ICM-LoRA's in-context task vector

EXAMPLE_FNS = {
    "reverse": lambda w: w[::-1], "upper": str.upper, "sort": lambda w: "".join(sorted(w)),
    "double": lambda w: "".join(c + c for c in w), "vowels": lambda w: "".join(c for c in w if c not in "aeiou"),
    "count": lambda w: str(len(w)),
}
WORDS = ["apple", "stone", "river", "cloud", "mango", "tiger", "piano", "lemon"]


def _examples(task: str, n: int = 6) -> list[dict[str, str]]:
    return [{"input": w, "output": EXAMPLE_FNS[task](w)} for w in WORDS[:n]]


@pytest.fixture(scope="module")
def icm_world(tmp_path_factory, encoder):
    from test_batch import _base_model

    root = tmp_path_factory.mktemp("icm-tv")
    _base_model(root / "base")
    spec = spec_from_config(root / "base", targets=["q_proj", "v_proj"], rank=4, base_model=str(root / "base"))
    reg = Registry.create(root / "registry", spec, encoder=encoder, seed=0)
    gen = torch.Generator().manual_seed(2)
    for name, descriptions in TASKS.items():
        centre = {m.name: torch.randn(spec.num_layers, m.out_features, spec.rank, generator=gen) for m in spec.modules}
        reg.add_expert(name, [{m: c + 0.05 * torch.randn(c.shape, generator=gen) for m, c in centre.items()}
                              for _ in range(3)], descriptions)
    examples = {name: _examples(name) for name in TASKS}
    trained = train_generator(reg, "icm", seed=0, out_dir=root / "icm", examples=examples, **TRAIN)
    return reg, trained, root


def test_task_vectors_match_unpadded_forwards(icm_world):
    from loragen.basemodel import BaseModel
    from loragen.generator.task_vector import TaskVectors

    reg, _, root = icm_world
    source = TaskVectors(reg.spec)
    sets = [_examples("reverse", 3), _examples("count", 1)]
    got = source.vectors(sets)
    base = BaseModel.load(root / "base")
    with torch.no_grad():
        for row, examples in zip(got, sets):
            states = []
            for ex in examples:
                enc = base.encode_pairs([ex["input"]], [ex["output"]])
                out = base.model(input_ids=enc["input_ids"], output_hidden_states=True)
                states.append(out.hidden_states[-1][0, -1].double())
            ref = torch.stack(states).mean(0)
            assert torch.allclose(row.double(), ref / ref.norm(), atol=1e-5)


def test_icm_uses_examples_when_trained_with_them(icm_world):
    reg, gen, root = icm_world
    assert gen.task_vector_dim == 32
    desc = ["reverse the letters of the input"]
    plain = gen.generate(desc, seed=0)[0]
    with_ex = gen.generate(desc, examples=[_examples("reverse", 4)], seed=0)[0]
    assert plain.metadata["examples_used"] is False and with_ex.metadata["examples_used"] is True
    assert not _same(plain, with_ex)
    # a batch mixing rows with and without examples equals the single calls
    batch = gen.generate(desc * 2, examples=[_examples("reverse", 4), []], seed=0)
    assert _same(batch[0], with_ex, atol=1e-5) and _same(batch[1], plain, atol=1e-5)
    # saved and loaded, it generates the same LoRA from the same examples
    loaded = LearnedGenerator.from_pretrained(root / "icm", reg)
    assert _same(loaded.generate(desc, examples=[_examples("reverse", 4)], seed=0)[0], with_ex, atol=1e-6)


def test_bad_examples_are_clear_errors(icm_world):
    _, gen, _ = icm_world
    with pytest.raises(GenerationError, match="one per description"):
        gen.generate(["reverse it", "sort it"], examples=[_examples("reverse")])
    with pytest.raises(GenerationError, match="string 'input' and 'output'"):
        gen.generate(["reverse it"], examples=[[{"input": "abc"}]])


def test_examples_without_a_local_base_model_are_a_clear_error(trained):
    gen, _ = trained  # its registry's base model, "tiny-llama", is not a local directory
    with pytest.raises(GenerationError, match="examples need the base model"):
        gen.generate(["sort the letters"], examples=[_examples("sort")], seed=0)
    assert gen.generate(["sort the letters"], examples=[[]], seed=0)[0].metadata["examples_used"] is False
    from loragen.generator import RetrievalGenerator

    with pytest.raises(GenerationError, match="examples need the base model"):
        RetrievalGenerator(gen.registry, "weighted").generate(["sort the letters"], examples=[_examples("sort")])


# ------------------------------------------------------------------ examples as evidence for the top-K experts

@pytest.fixture(scope="module")
def sg_on_base(icm_world):
    reg, _, root = icm_world
    return train_generator(reg, "sg", seed=0, out_dir=root / "sg", **TRAIN)


def _peft_logprob(base_dir, lora, tmp_path, examples) -> float:
    """Σ log p(output tokens + eos | prompt) under PEFT's own LoRA, one unpadded pass per example, float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loragen.basemodel import BaseModel

    lora.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).double(), tmp_path).double().eval()
    fmt = BaseModel.load(base_dir)
    total = 0.0
    with torch.no_grad():
        for ex in examples:
            enc = fmt.encode_pairs([ex["input"]], [ex["output"]])
            logp = torch.log_softmax(model(input_ids=enc["input_ids"]).logits[0, :-1], dim=-1)
            labels = enc["labels"][0, 1:]
            keep = labels != -100
            total += float(logp[keep].gather(1, labels[keep, None]).sum())
    return total


def test_example_logprobs_match_peft(icm_world, tmp_path):
    from loragen.generator.example_evidence import example_logprobs

    reg, gen, root = icm_world
    sets = [_examples("reverse", 3), [], _examples("count", 2)]
    candidates = [[0, 2], [1], [3, 0, 5]]
    evidence = example_logprobs(gen.task_vectors.base, gen.expert_stack, sets, candidates)
    got = evidence.logprobs
    assert got[1] is None and evidence.fit(1) is None and evidence.ood(1) is None
    experts = gen.experts()
    base = gen.task_vectors.base
    for row, examples in enumerate(sets):  # output tokens, eos included, the same for every candidate
        tokens = sum(len(base.tokenizer(ex["output"], add_special_tokens=False)["input_ids"]) + 1 for ex in examples)
        assert evidence.tokens[row] == tokens
        if examples:
            assert evidence.fit(row) == pytest.approx(math.exp(max(got[row]) / tokens))
            assert evidence.ood(row) == (evidence.fit(row) < 0.5)
    for row, (examples, cands) in enumerate(zip(sets, candidates)):
        for k, col in enumerate(cands if examples else []):
            ref = _peft_logprob(root / "base", reg.lora(experts[col]), tmp_path / f"{row}-{k}", examples)
            assert got[row][k] == pytest.approx(ref, abs=1e-3)


def test_examples_move_the_weight_to_the_expert_that_explains_them(icm_world, sg_on_base):
    from loragen.generator import RetrievalGenerator
    from loragen.generator.example_evidence import EXAMPLE_CANDIDATES

    reg, icm, _ = icm_world
    weighted = RetrievalGenerator(reg, "weighted", k=4)
    desc = ["change the letters of the word"]  # close to several experts' descriptions
    for gen, tau in ((icm, icm.model.config.temperature), (sg_on_base, sg_on_base.model.config.temperature),
                     (weighted, weighted.temperature)):
        plain = gen.generate(desc, seed=0)[0]
        first, second = plain.metadata["neighbours"][:2]
        # examples only the second neighbour's expert would produce: its own greedy completions
        base = gen.task_vectors.base
        outputs = base.complete(WORDS, loras=[reg.lora(second["expert"])] * len(WORDS), max_new_tokens=6)
        examples = [{"input": w, "output": o} for w, o in zip(WORDS, outputs)]
        lora = gen.generate(desc, examples=[examples], seed=0)[0]
        meta = lora.metadata
        assert meta["examples_used"] is True and 0 < meta["examples_fit"] <= 1
        assert meta["examples_ood"] == (meta["examples_fit"] < 0.5) and plain.metadata["examples_fit"] is None
        # the examples weigh more candidates than the description's K (here every expert)
        assert len(meta["neighbours"]) == min(EXAMPLE_CANDIDATES, len(TASKS)) > len(plain.metadata["neighbours"])
        assert max(meta["neighbours"], key=lambda n: n["weight"])["expert"] == second["expert"], meta["neighbours"]
        sims = torch.tensor([n["similarity"] for n in meta["neighbours"]], dtype=torch.float64)
        logp = torch.tensor([n["example_logprob"] for n in meta["neighbours"]], dtype=torch.float64)
        alpha = torch.softmax(sims / tau + logp, dim=0)
        assert [n["weight"] for n in meta["neighbours"]] == pytest.approx(alpha.tolist(), abs=1e-6)
        assert not _same(lora, plain)
        # a batch mixing rows with and without examples equals the single calls
        batch = gen.generate(desc * 2, examples=[[], examples], seed=0)
        assert _same(batch[0], plain, atol=1e-5) and _same(batch[1], lora, atol=1e-5)
        assert [(n["expert"], n["example_logprob"]) for n in batch[0].metadata["neighbours"]] == \
            [(n["expert"], None) for n in plain.metadata["neighbours"]]
    # nearest, topk and uniform have no weights to re-weigh, and say they ignored the examples
    nearest = RetrievalGenerator(reg, "nearest").generate(desc, examples=[examples])[0]
    assert nearest.metadata["examples_used"] is False and nearest.metadata["neighbours"][0]["example_logprob"] is None


# ------------------------------------------------------------------ description head, GSNN term, self conditions


def test_description_head_pulls_an_experts_paraphrases_together(registry):
    import numpy as np

    from loragen.generator.description_head import DescriptionHead

    _, owners, vecs = registry.store.embeddings(registry.dim)
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    head = DescriptionHead.fit(vecs, owners, seed=0)
    assert head is not None
    projected = head.project(vecs)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, rtol=1e-5)
    same = owners[:, None] == owners[None, :]
    np.fill_diagonal(same, False)

    def margin(x):  # mean similarity to the expert's other descriptions minus to other experts'
        sims = x @ x.T
        other = ~same & ~np.eye(len(x), dtype=bool)
        return sims[same].mean() - sims[other].mean()

    assert margin(projected) > margin(vecs) + 0.1
    # One description per expert: nothing to learn from, so no head.
    firsts = np.unique(owners, return_index=True)[1]
    assert DescriptionHead.fit(vecs[firsts], owners[firsts]) is None


def test_a_generator_without_a_tuned_encoder_keeps_its_description_head(registry, tmp_path):
    gen = train_generator(registry, "sg", out_dir=tmp_path, description_encoder=False, **{**TRAIN, "epochs": 1})
    out = tmp_path
    assert gen.encoder is None and gen.config.description_encoder is None
    assert gen.head is not None and gen.config.description_head.weight_decay == HeadConfig().weight_decay
    loaded = LearnedGenerator.from_pretrained(out, registry)
    assert loaded.head is not None and torch.equal(loaded.head.weight, gen.head.weight)
    # Neighbours are ranked and weighted by their similarity in the head's space.
    neighbours = gen.generate(["put the characters in order"], seed=0)[0].metadata["neighbours"]
    query = gen.space.describe(registry.encoder.encode(["put the characters in order"]))
    desc = gen.space.describe(registry.encoder.encode(TASKS[neighbours[0]["expert"]]))
    assert neighbours[0]["similarity"] == pytest.approx(float((query @ desc.T).max()), abs=1e-5)
    sims = [n["similarity"] for n in neighbours]
    assert sims == sorted(sims, reverse=True)


def test_trained_generators_keep_their_tuned_encoder_and_its_head(trained, registry):
    import numpy as np

    gen, out = trained
    assert gen.head is not None and gen.encoder is not None
    layers = gen.config.description_encoder.layers
    assert {k.split(".")[2] for k in gen.encoder.weights} == {str(6 - i) for i in range(1, layers + 1)}
    # The registry's own encoder (and so its FAISS index) is untouched.
    probe = ["put the characters in order"]
    assert not np.allclose(gen.embed(probe), registry.encoder.encode(probe), atol=1e-4)
    stored = registry.store.embeddings(registry.dim)[2]
    np.testing.assert_allclose(registry.encoder.encode([t for ts in TASKS.values() for t in ts]), stored, atol=1e-5)
    # The tuned copy holds only its tuned tensors; the rest are the registry encoder's own.
    base = registry.encoder.transformer[0].auto_model.state_dict()
    for name, tensor in gen.encoder.encoder.transformer[0].auto_model.state_dict().items():
        assert (tensor.data_ptr() == base[name].data_ptr()) == (name not in gen.encoder.weights), name
    loaded = LearnedGenerator.from_pretrained(out, registry)
    assert loaded.encoder is not None and torch.equal(loaded.head.weight, gen.head.weight)
    np.testing.assert_allclose(loaded.embed(probe), gen.embed(probe), atol=1e-6)
    assert _same(loaded.generate(probe, seed=1)[0], gen.generate(probe, seed=1)[0], atol=1e-6)
    # Neighbours are ranked and weighted by their similarity in the tuned space, through the head.
    raw = gen.encoder.encode(probe)
    np.testing.assert_allclose(gen.embed(probe), gen.head.project(raw / np.linalg.norm(raw)), atol=1e-6)
    neighbours = gen.generate(probe, seed=0)[0].metadata["neighbours"]
    desc = gen.embed(TASKS[neighbours[0]["expert"]])
    assert neighbours[0]["expert"] == "sort"
    assert neighbours[0]["similarity"] == pytest.approx(float((gen.embed(probe) @ desc.T).max()), abs=1e-5)
    # Generators of one registry can share one tuned encoder.
    other = "icm" if gen.method == "sg" else "sg"
    shared = train_generator(registry, other, description_encoder=gen.encoder, **{**TRAIN, "epochs": 1})
    assert shared.encoder is gen.encoder and shared.config.description_encoder == gen.config.description_encoder


def test_a_loaded_generator_reads_the_registry_from_its_saved_description_vectors(trained, registry, tmp_path):
    """Loading does not run the tuned encoder over the registry again: the checkpoint's vectors are
    training's, bit for bit; a description the checkpoint has not seen is encoded, alone; a
    checkpoint whose vectors are missing or unreadable still loads and encodes them."""
    from loragen.generator import persistence

    gen, out = trained
    assert (out / persistence.VECTORS_NAME).is_file()
    calls: list[list[str]] = []

    def counted(loaded: LearnedGenerator) -> LearnedGenerator:
        encode = loaded.encoder.encode
        loaded.encoder.encode = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
        return loaded

    loaded = counted(LearnedGenerator.from_pretrained(out, registry))
    assert torch.equal(loaded.space.described[0], gen.space.described[0]) and calls == []
    probe = ["put the characters in order"]
    assert _same(loaded.generate(probe, seed=1)[0], gen.generate(probe, seed=1)[0])

    calls.clear()
    saved = persistence.load(out, registry)
    texts, vecs = saved.known_vectors
    partial = counted(LearnedGenerator(registry, saved.model, saved.safety, saved.config, head=saved.head,
                                       encoder=saved.encoder, known_vectors=(texts[1:], vecs[1:])))
    torch.testing.assert_close(partial.space.described[0], gen.space.described[0], atol=1e-6, rtol=0)
    assert calls == [[texts[0]]]

    for damage in ("missing", "garbled"):
        copy = shutil.copytree(out, tmp_path / damage)
        if damage == "missing":
            (copy / persistence.VECTORS_NAME).unlink()
        else:
            (copy / persistence.VECTORS_NAME).write_bytes(b"not safetensors")
        calls.clear()
        again = counted(LearnedGenerator.from_pretrained(copy, registry))
        torch.testing.assert_close(again.space.described[0], gen.space.described[0], atol=1e-6, rtol=0)
        assert calls == [texts]


def test_fine_tuning_pulls_an_experts_paraphrases_together(registry):
    import numpy as np

    from loragen.generator.description_encoder import DescriptionEncoder, TuningConfig, fine_tune

    texts = [t for ts in TASKS.values() for t in ts]
    owners = np.array([i for i, ts in enumerate(TASKS.values()) for _ in ts])
    weights, again = (fine_tune(registry.encoder, texts, owners, seed=0) for _ in range(2))
    assert weights is not None and again is not None and weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # deterministic for a seed
    tuned = DescriptionEncoder(registry.encoder, weights, TuningConfig()).encode(texts)
    raw = registry.encoder.encode(texts)
    same = (owners[:, None] == owners[None, :]) & ~np.eye(len(texts), dtype=bool)
    other = owners[:, None] != owners[None, :]

    def margin(x):  # mean similarity to the expert's other descriptions minus to other experts'
        sims = x @ x.T
        return sims[same].mean() - sims[other].mean()

    assert margin(tuned) > margin(raw) + 0.1
    # One description per expert: nothing to learn from.
    firsts = np.unique(owners, return_index=True)[1]
    assert fine_tune(registry.encoder, [texts[i] for i in firsts], owners[firsts]) is None


def test_frozen_layers_run_per_length_batch_give_the_full_width_states(registry):
    import copy

    from loragen.generator.description_encoder import frozen_states

    texts = [t for ts in TASKS.values() for t in ts] + ["a much longer description " * 6]
    model = copy.deepcopy(registry.encoder.transformer).to("cpu", torch.float32)
    bert = model[0].auto_model
    features = (getattr(model, "preprocess", None) or model.tokenize)(texts)
    mask = features["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        full = bert.embeddings(input_ids=features["input_ids"], token_type_ids=features.get("token_type_ids"))
        for layer in bert.encoder.layer[:4]:
            full = layer(full, additive)
    batched = frozen_states(bert, features, 4, batch=3)
    valid = mask.bool()
    assert batched.shape == full.shape
    torch.testing.assert_close(batched[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_prior_weight_adds_the_decode_from_the_prior(registry):
    from loragen.generator.tokens import RegistryTokens
    from loragen.generator.training import training_set

    gen = train_generator(registry, "sg", **{**TRAIN, "epochs": 1})
    data = training_set(gen, RegistryTokens(registry, gen.model.layout, set()))
    cps = torch.arange(4)
    batch = data.batch(cps, data.pick_descriptions(cps, None))
    model = gen.model
    without, _, _ = model.loss(*batch, None)
    model.config.prior_weight = 0.5
    try:
        with_prior, _, _ = model.loss(*batch, None)
    finally:
        model.config.prior_weight = 0.0
    tokens, text, mu, sigma = batch
    cond, feats = model.encode_condition(text, mu, sigma)
    recon = model.decode(model.prior(cond)[0], cond, feats, mu, sigma)
    mse = sum(((r - t) ** 2).sum() for r, t in zip(recon, tokens)) / sum(t.numel() for t in tokens)
    torch.testing.assert_close(with_prior - without, 0.5 * mse)


def test_sg_draws_self_conditions_with_their_fraction(registry):
    from loragen.generator.tokens import RegistryTokens
    from loragen.generator.training import training_set

    gen = train_generator(registry, "sg", **{**TRAIN, "epochs": 1})
    data = training_set(gen, RegistryTokens(registry, gen.model.layout, set()), self_fraction=1.0)
    cps = torch.arange(6)
    descs = data.pick_descriptions(cps, None)
    _, _, mu_train, _ = data.batch(cps, descs, torch.Generator().manual_seed(0))
    _, _, mu_val, _ = data.batch(cps, descs)  # validation keeps the leave-one-out conditions
    assert all(torch.equal(a, s[descs]) for a, s in zip(mu_train, data.mu_self))
    assert all(torch.equal(a, s[descs]) for a, s in zip(mu_val, data.mu_star))
    assert not all(torch.equal(a, b) for a, b in zip(mu_train, mu_val))


# ------------------------------------------------------------------ icm's memory read of its condition


def test_icm_memory_condition_is_the_keys_of_its_neighbours(registry, tmp_path):
    import numpy as np

    from loragen.generator.tokens import RegistryTokens
    from loragen.generator.training import training_set

    gen = train_generator(registry, "icm", out_dir=tmp_path / "icm", temperature=1e-4, **{**TRAIN, "epochs": 1})
    assert gen.reads_memory and gen.config.cvae.condition_from == "memory"
    # Two wordings whose nearest expert is the same read the same key, so give the same LoRA.
    a, b = gen.generate(["write the letters backwards", "reverse the string"], seed=5)
    assert [x.metadata["neighbours"][0]["expert"] for x in (a, b)] == ["reverse", "reverse"]
    assert _same(a, b, atol=1e-6)
    text = train_generator(registry, "icm", condition_from="text", **{**TRAIN, "epochs": 1})
    c, d = text.generate(["write the letters backwards", "reverse the string"], seed=5)
    assert not text.reads_memory and not _same(c, d, atol=1e-6)
    loaded = LearnedGenerator.from_pretrained(tmp_path / "icm", registry)
    again = loaded.generate(["write the letters backwards", "reverse the string"], seed=5)[1]
    assert loaded.reads_memory and _same(again, b, atol=1e-6)

    # Training conditions, against float64 reference math: each description's own registry entry is
    # left out, the rest scored per expert by its best description, softmax over the top K; a row
    # whose left-out read ranks another expert first keeps its own entry.
    gen = train_generator(registry, "icm", temperature=0.05, description_encoder=False, description_head=False,
                          **{**TRAIN, "epochs": 1})
    data = training_set(gen, RegistryTokens(registry, gen.model.layout, set()))
    desc, col = (t.double().numpy() for t in gen.space.described[:2])
    col = col.astype(int)
    sims = desc @ desc.T
    assert np.bincount(col).min() >= 2  # every expert keeps another description to be found by
    experts = col.max() + 1
    per_expert = lambda s: np.stack([s[:, col == e].max(axis=1) for e in range(experts)], axis=1)  # noqa: E731
    left_out = sims.copy()
    np.fill_diagonal(left_out, -np.inf)
    best = per_expert(left_out)
    misread = best.argmax(axis=1) != col
    assert misread.any() and not misread.all()  # raw MiniLM misreads some of these descriptions
    best[misread] = per_expert(sims)[misread]
    keys = np.stack([desc[col == e].sum(axis=0) for e in range(experts)])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    want = np.zeros((len(desc), desc.shape[1]))
    for i, row in enumerate(best):
        top = np.argsort(-row)[: gen.model.config.top_k]
        alpha = np.exp((row[top] - row[top].max()) / 0.05)
        want[i] = (alpha / alpha.sum()) @ keys[top]
    np.testing.assert_allclose(data.text.double().numpy(), want, atol=1e-5)


def test_memory_condition_keeps_an_experts_only_description(tmp_path, encoder):
    from loragen.generator.tokens import RegistryTokens
    from loragen.generator.training import training_set

    reg = _registry(tmp_path / "registry", encoder)
    spec = reg.spec
    reg.add_expert("lonely", [{m.name: torch.randn(spec.num_layers, m.out_features, spec.rank) for m in spec.modules}],
                   ["translate the word into pig latin"])
    gen = train_generator(reg, "icm", temperature=1e-4, **{**TRAIN, "epochs": 1})
    data = training_set(gen, RegistryTokens(reg, gen.model.layout, set()))
    lonely = gen.space.column[reg.get("lonely").id]
    row = int((gen.space.described[1] == lonely).nonzero())
    torch.testing.assert_close(data.text[row], gen.space.memory_keys[lonely])


def test_icm_reads_memory_by_default_only_where_experts_have_several_descriptions(registry, tmp_path, encoder):
    assert train_generator(registry, "icm", **{**TRAIN, "epochs": 1}).reads_memory
    single = Registry.create(tmp_path / "single", _spec(), encoder=encoder, seed=0)
    gen = torch.Generator().manual_seed(2)
    for name, descriptions in TASKS.items():
        cps = [{m.name: torch.randn(single.spec.num_layers, m.out_features, single.spec.rank, generator=gen)
                for m in single.spec.modules}]
        single.add_expert(name, cps, descriptions[:1])
    icm = train_generator(single, "icm", **{**TRAIN, "epochs": 1})
    assert not icm.reads_memory and icm.config.cvae.condition_from == "text"
    assert train_generator(single, "icm", condition_from="memory", **{**TRAIN, "epochs": 1}).reads_memory


def test_memory_condition_is_icm_only(registry):
    with pytest.raises(GenerationError, match="sg reads text"):
        train_generator(registry, "sg", condition_from="memory", **{**TRAIN, "epochs": 1})
    with pytest.raises(GenerationError, match="condition_from"):
        train_generator(registry, "icm", condition_from="keys", **{**TRAIN, "epochs": 1})


def test_safety_clips_only_the_rows_out_of_range_and_names_the_non_finite_one():
    from loragen.generator.safety import Safety

    gen = torch.Generator().manual_seed(0)
    B = {m: torch.randn(3, 2, 5, 4, generator=gen) for m in ("q", "v")}
    B["v"][1, 1] *= 10  # request 1, layer 1 of v: far above the range
    ref = {m: b.double().flatten(2).norm(dim=-1) for m, b in B.items()}  # (N, L), float64
    lo = {m: torch.full((2,), 0.5) for m in B}
    hi = {m: ref[m][[0, 2]].max(dim=0).values.float() * 2 for m in B}
    safety = Safety(lo, hi, -1.0)
    out, clipped = safety.clip(B, safety.norms(B))
    assert clipped.tolist() == [False, True, False]
    for m in B:
        for i in (0, 2):
            assert torch.equal(out[m][i], B[m][i])
    assert torch.equal(out["q"][1], B["q"][1]) and torch.equal(out["v"][1, 0], B["v"][1, 0])
    want = B["v"][1, 1].double() * float(hi["v"][1]) / ref["v"][1, 1]
    torch.testing.assert_close(out["v"][1, 1].double(), want, rtol=1e-6, atol=0)
    same, none = safety.clip({m: b[[0, 2]] for m, b in B.items()})
    assert not none.any() and all(torch.equal(same[m], B[m][[0, 2]]) for m in B)

    B["v"][2, 0, 1, 1] = float("inf")
    safety.check_finite({m: b[:2] for m, b in B.items()}, ["a", "b"])
    with pytest.raises(GenerationError, match=r"in v for description 'c'"):
        safety.check_finite(B, ["a", "b", "c"])


def test_the_ood_threshold_is_calibrated_in_the_generators_own_space(trained):
    import numpy as np

    from loragen.generator.safety import OOD_PERCENTILE, calibrate_ood

    gen, _ = trained
    desc, col, _ = gen.space.described
    x, owner = desc.double().numpy(), col.numpy()
    sims = x @ x.T
    best = [sims[i, owner != owner[i]].max() for i in range(len(x))]  # each one's nearest other expert
    expected = float(np.percentile(best, OOD_PERCENTILE))
    assert gen.safety.ood_threshold == pytest.approx(expected, abs=1e-6)
    assert calibrate_ood(desc, col) == pytest.approx(expected, abs=1e-6)
    assert calibrate_ood(desc[col == 0], col[col == 0]) == -1.0  # one expert: nothing to compare, never flag
    # In the head's space, not the raw embedding's, which is not the space the generator searches.
    raw = gen.registry.store.embeddings(gen.registry.dim)[2]
    assert calibrate_ood(torch.from_numpy(raw / np.linalg.norm(raw, axis=1, keepdims=True)), col) != pytest.approx(
        gen.safety.ood_threshold, abs=1e-3)


def test_prior_mixture_matches_the_formula_in_float64_dense_or_gathered():
    from loragen.generator.learned import SIGMA_FLOOR, mix

    g = torch.Generator().manual_seed(0)
    for n, experts in ((3, 5), (3, 40)):  # 5 experts: read them all; 40 > 8·4: gather each row's four
        mean = [torch.randn(experts, 3, 6, generator=g, dtype=torch.float64)]
        second = [m * m + torch.rand(experts, 3, 6, generator=g, dtype=torch.float64) for m in mean]
        weights = torch.zeros(n, experts, dtype=torch.float64)
        for row in range(n):
            cols = torch.randperm(experts, generator=g)[:4]
            weights[row, cols] = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
        mu, sigma = mix(weights, mean, second, k=4)
        single = mix(weights[1:2], mean, second, k=4)
        assert torch.equal(single[0][0][0], mu[0][1]) and torch.equal(single[1][0][0], sigma[0][1])
        for row in range(n):
            cols = weights[row].nonzero().flatten()
            a = weights[row, cols][:, None, None]
            mu_ref = (a * mean[0][cols]).sum(0)
            var_ref = (a * (second[0][cols] - mean[0][cols] ** 2)).sum(0) + (a * (mean[0][cols] - mu_ref) ** 2).sum(0)
            torch.testing.assert_close(mu[0][row], mu_ref)
            torch.testing.assert_close(sigma[0][row], (var_ref.clamp_min(0) + SIGMA_FLOOR).sqrt())


# ------------------------------------------------------------------ examples written in the description

def test_examples_in_a_description_are_parsed():
    from loragen.generator.inline_examples import examples_in

    assert examples_in("reverse it, e.g. garden -> nedrag") == [{"input": "garden", "output": "nedrag"}]
    assert examples_in("so sun -> sunsun. Also (ab → ba)") == [{"input": "sun", "output": "sunsun"},
                                                               {"input": "ab", "output": "ba"}]
    assert examples_in('mask them: "big table" -> "b*g t*bl*"') == [{"input": "big table", "output": "b*g t*bl*"}]
    assert examples_in("table -> t*bl*") == [{"input": "table", "output": "t*bl*"}]
    # `=>` is also code's function arrow; no arrow, no examples
    assert examples_in("s => s.split('').reverse()") == [] == examples_in("reverse the letters")
    # an unquoted pair must end its clause: more words after it mean its sides may be longer
    assert examples_in("reverse it: hello world -> dlrow olleh") == []
    assert examples_in("abc -> cba xyz -> zyx") == [{"input": "abc", "output": "cba"}, {"input": "xyz", "output": "zyx"}]
    assert examples_in("abc -> cba, then xyz -> zyx and so on") == [{"input": "abc", "output": "cba"}]


def test_cli_example_pairs_take_any_arrow():
    from loragen.cli.generate_cmds import _example_pair
    from loragen.errors import LoragenError

    for text in ("abc->cba", "abc -> cba", "abc=>cba", "abc → cba"):
        assert _example_pair(text) == {"input": "abc", "output": "cba"}
    assert _example_pair("hello world -> dlrow olleh") == {"input": "hello world", "output": "dlrow olleh"}
    assert _example_pair("a->b->c") == {"input": "a", "output": "b->c"}
    with pytest.raises(LoragenError, match="is not INPUT->OUTPUT"):
        _example_pair("abc")


def test_a_description_s_own_examples_act_like_given_ones(icm_world, sg_on_base):
    from loragen.generator import RetrievalGenerator

    reg, icm, _ = icm_world
    desc = "change the letters of the word"
    pair = {"input": "stone", "output": "enots"}
    written = f"{desc}, e.g. stone -> enots"
    for gen in (icm, sg_on_base, RetrievalGenerator(reg, "weighted", k=4)):
        given = gen.generate([written], examples=[[pair]], seed=0)[0]
        inline = gen.generate([written], seed=0)[0]
        assert inline.metadata["examples_used"] and inline.metadata["examples_from_description"]
        assert not given.metadata["examples_from_description"]
        assert inline.metadata["neighbours"] == given.metadata["neighbours"]
        assert _same(inline, given)
        # given examples take the place of the written ones, in a batch as alone
        other = [{"input": "stone", "output": "stone"}]
        batch = gen.generate([written, written], examples=[other, []], seed=0)
        assert _same(batch[0], gen.generate([written], examples=[other], seed=0)[0], atol=1e-5)
        assert _same(batch[1], inline, atol=1e-5) and batch[1].metadata["examples_from_description"]
        gen.inline_examples = False
        try:
            off = gen.generate([written], seed=0)[0]
        finally:
            gen.inline_examples = True
        assert off.metadata["examples_used"] is False and not off.metadata["examples_from_description"]
        assert all(n["example_logprob"] is None for n in off.metadata["neighbours"])


def test_written_examples_without_a_local_base_model_are_ignored(trained):
    gen, _ = trained  # its base model, "tiny-llama", is not a local directory: explicit examples are an error
    lora = gen.generate(["sort the letters, e.g. cab -> abc"], seed=0)[0]
    assert lora.metadata["examples_used"] is False and lora.metadata["examples_from_description"] is False


# ------------------------------------------------------------------ compiled decoder (CUDA graphs on a GPU)

def test_compiled_batch_sizes_are_padded_to_powers_of_two():
    from loragen.generator.compiled_decode import bucket

    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 256)] == [1, 2, 4, 4, 8, 8, 16, 256]


def test_a_compiled_decoder_generates_what_the_eager_one_does(trained, registry):
    gen, directory = trained
    compiled = load_generator(gen.method, registry, generator_dir=directory, compile_decoder=True)
    descriptions = ["reverse the string", "sort the letters", "remove every vowel"]  # padded to 4
    eager = gen.generate(descriptions, seed=3, num_samples=2)
    got = compiled.generate(descriptions, seed=3, num_samples=2)
    assert len(got) == 6 and all(_same(a, b, atol=1e-5) for a, b in zip(got, eager))
    first = compiled.generate(descriptions[:1], seed=3, num_samples=2)  # another graph, same answer
    assert _same(first[0], eager[0], atol=1e-5) and _same(first[1], eager[1], atol=1e-5)
    assert got[0].B[next(iter(got[0].B))].data_ptr() != first[0].B[next(iter(first[0].B))].data_ptr()


def test_a_decoder_that_does_not_compile_decodes_eagerly(trained, registry, monkeypatch, caplog):
    from loragen.generator import compiled_decode

    def broken(fn, **_):
        def fail(*args):
            raise RuntimeError("no C++ compiler here")
        return fail

    monkeypatch.setattr(compiled_decode.torch, "compile", broken)
    gen, directory = trained
    compiled = load_generator(gen.method, registry, generator_dir=directory, compile_decoder=True)
    with caplog.at_level("WARNING"):
        got = compiled.generate(["reverse the string"], seed=1)[0]
    assert _same(got, gen.generate(["reverse the string"], seed=1)[0])
    assert "decoding eagerly" in caplog.text and compiled.fused_decode.compiled is None
