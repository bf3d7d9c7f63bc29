"""CUDA paths: generation in bf16/fp16 on the GPU against the float32 CPU reference. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, TINY_CONFIGS
from test_generators import TRAIN, _examples, _registry, icm_world  # noqa: F401 (fixture)

from loragen.adapters import spec_from_config
from loragen.generator import LearnedGenerator, train_generator
from loragen.bench.decode import build_generator, fused_decode, naive_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DESCRIPTIONS = ["reverse the string", "sort the letters", "remove every vowel", "count the characters"]


@pytest.fixture(scope="module", params=["icm", "sg"])
def trained(request, tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp(f"gpu-{request.param}")
    registry = _registry(root / "registry", encoder)
    cpu = train_generator(registry, request.param, seed=0, out_dir=root / "generator", **TRAIN)
    return registry, root / "generator", cpu


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_generation_matches_cpu(trained, dtype):
    registry, directory, cpu = trained
    gpu = LearnedGenerator.from_pretrained(directory, registry, device="cuda", dtype=dtype)
    ref = cpu.generate(DESCRIPTIONS, seed=1)
    got = gpu.generate(DESCRIPTIONS, seed=1)
    for r, g in zip(ref, got):
        assert [n["expert"] for n in g.metadata["neighbours"]] == [n["expert"] for n in r.metadata["neighbours"]]
        for m in r.B:
            assert g.B[m].dtype == dtype and g.B[m].shape == r.B[m].shape
            assert _relative_error(g.B[m], r.B[m]) < 2e-2


def test_cuda_seed_determinism_and_batch_vs_singles(trained):
    registry, directory, _ = trained
    gpu = LearnedGenerator.from_pretrained(directory, registry, device="cuda", dtype=torch.bfloat16)
    a = gpu.generate(DESCRIPTIONS, seed=5)
    b = gpu.generate(DESCRIPTIONS, seed=5)
    singles = [gpu.generate([d], seed=5)[0] for d in DESCRIPTIONS]
    for x, y, s in zip(a, b, singles):
        for m in x.B:
            assert torch.equal(x.B[m], y.B[m])
            assert _relative_error(s.B[m], x.B[m].float().cpu()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_decode_agrees_with_the_naive_loop_on_cuda(dtype):
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=TARGETS["llama"], rank=4, base_model="tiny")
    gen = build_generator(spec, hidden=64, latent=16, device="cuda", dtype=dtype)
    text = torch.nn.functional.normalize(torch.randn(5, 384), dim=1)
    noise = torch.randn(1, 16)
    with torch.no_grad():
        fused = fused_decode(gen, text, noise)
    naive = naive_decode(gen, text, noise)
    for m in fused:
        assert fused[m].dtype == dtype and fused[m].is_cuda
        assert _relative_error(fused[m], naive[m].float().cpu()) < 2e-2


@pytest.mark.parametrize("method", ["icm", "sg"])
def test_examples_as_evidence_on_cuda(icm_world, method):  # noqa: F811 (the imported fixture)
    """The base model scores the candidates' LoRAs on the GPU as on the CPU (bf16 generator, fp32 base)."""
    reg, icm, root = icm_world
    cpu = icm if method == "icm" else train_generator(reg, "sg", seed=0, out_dir=root / "sg-gpu", **TRAIN)
    gpu = LearnedGenerator.from_pretrained(root / ("icm" if method == "icm" else "sg-gpu"), reg,
                                           device="cuda", dtype=torch.bfloat16)
    desc = ["change the letters of the word", "count the characters"]
    examples = [_examples("reverse", 4), []]
    ref = cpu.generate(desc, examples=examples, seed=0)
    got = gpu.generate(desc, examples=examples, seed=0)
    for r, g in zip(ref, got):
        assert g.metadata["examples_used"] == r.metadata["examples_used"]
        rn, gn = r.metadata["neighbours"], g.metadata["neighbours"]
        assert [n["expert"] for n in gn] == [n["expert"] for n in rn]
        for a, b in zip(rn, gn):
            assert (a["example_logprob"] is None) == (b["example_logprob"] is None)
            if a["example_logprob"] is not None:
                assert b["example_logprob"] == pytest.approx(a["example_logprob"], rel=2e-2, abs=0.1)
            assert b["weight"] == pytest.approx(a["weight"], abs=2e-2)
        for m in r.B:
            assert g.B[m].dtype == torch.bfloat16 and _relative_error(g.B[m], r.B[m]) < 3e-2


def test_the_service_on_cuda_answers_as_on_cpu(world, encoder):  # noqa: F811 (the imported fixture)
    """A live server with `device=cuda`: a generation that uses the examples its description writes,
    then a completion with that LoRA on the shared base model, against the same on a CPU server."""
    from conftest import uvicorn_server

    from loragen.api import ApiSettings, create_app
    from loragen.client import Client

    got = {}
    for device in ("cpu", "cuda"):
        settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / f"home-{device}",
                               device=device, encoder_dtype="float32")
        with uvicorn_server(create_app(settings, encoder=encoder)) as url, Client(url, timeout=120) as c:
            result = c.generate("english to french, e.g. abc -> cba", method="sg", seed=0)
            got[device] = result, c.complete("abcd", lora_id=result.id, max_tokens=8).text
    (cpu, cpu_text), (gpu, gpu_text) = got["cpu"], got["cuda"]
    assert gpu.examples_from_description and [n.expert for n in gpu.neighbours] == [n.expert for n in cpu.neighbours]
    assert [n.weight for n in gpu.neighbours] == pytest.approx([n.weight for n in cpu.neighbours], abs=2e-2)
    assert gpu.examples_fit == pytest.approx(cpu.examples_fit, rel=2e-2)
    assert cpu.lora is not None and gpu.lora is not None
    for m in cpu.lora.B:
        assert _relative_error(gpu.lora.B[m], cpu.lora.B[m]) < 3e-2
    assert gpu_text == cpu_text


def test_cuda_graph_decoder_generates_what_the_eager_one_does(trained):
    from loragen.generator import load_generator

    registry, directory, cpu = trained
    eager = LearnedGenerator.from_pretrained(directory, registry, device="cuda", dtype=torch.bfloat16)
    graphs = load_generator(cpu.method, registry, generator_dir=directory, device="cuda", dtype=torch.bfloat16,
                            compile_decoder=True)
    ref = eager.generate(DESCRIPTIONS[:3], seed=2, num_samples=2)
    got = graphs.generate(DESCRIPTIONS[:3], seed=2, num_samples=2)  # 3 requests padded to a graph of 4
    kept = [{m: b.clone() for m, b in lo.B.items()} for lo in got]
    graphs.generate(DESCRIPTIONS[1:], seed=7, num_samples=2)  # a replay must not overwrite returned LoRAs
    assert graphs.fused_decode.compiled is not None  # compiled, not fallen back to eager
    for r, g, k in zip(ref, got, kept):
        for m in r.B:
            assert g.B[m].dtype == torch.bfloat16 and torch.equal(g.B[m], k[m])
            assert _relative_error(g.B[m], r.B[m].cpu()) < 1e-2


def test_a_server_on_cuda_replays_cuda_graphs(world, encoder):  # noqa: F811 (the imported fixture)
    """`compile_decoder` on a live cuda server (engine thread): concurrent requests get the LoRAs of the
    eager GPU generator."""
    import asyncio

    from conftest import uvicorn_server

    from loragen.api import ApiSettings, create_app
    from loragen.client import AsyncClient
    from loragen.generator import load_generator
    from loragen.registry import Registry

    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home-graphs",
                           device="cuda", encoder_dtype="float32", compile_decoder=True, max_batch=4, max_wait_ms=50)
    app = create_app(settings, encoder=encoder)
    descriptions = ["english to french", "reverse the word", "arithmetic for kids"]
    with uvicorn_server(app) as url:  # sg's decode under plain CUDA graphs falls back to eager (see compiled_decode.py)

        async def run() -> list:
            async with AsyncClient(url) as ac:
                return await asyncio.gather(*(ac.generate(d, method="sg", seed=2) for d in descriptions))

        served = asyncio.run(run())
    reg = Registry.open(world / "registry")
    eager = load_generator("sg", reg, generator_dir=world / "generators" / "sg", device="cuda").generate(descriptions, seed=2)
    for r, e in zip(served, eager):
        for m in e.B:
            assert _relative_error(r.lora.B[m], e.B[m].cpu()) < 1e-2
    reg.close()
