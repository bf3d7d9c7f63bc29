"""The HTTP service and the SDK against a real uvicorn server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from conftest import EXPERTS, uvicorn_server
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loragen.adapters import Lora, spec_from_config
from loragen.api import ApiSettings, create_app
from loragen.basemodel import BaseModel
from loragen.client import (AsyncClient, AuthenticationError, BadRequestError, Client, ConflictError,
                            NotFoundError)
from loragen.embeddings import TextEncoder
from loragen.generator import load_generator
from loragen.registry import Registry
from loragen.registry.multitask import load_multitask

KEY = "s3cret-key"
@pytest.fixture(scope="module")
def server(world: Path, encoder: TextEncoder):
    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home",
                           api_keys=[KEY], max_wait_ms=5, max_body_bytes=2**20,
                           encoder_dtype="float32")  # tests compare with the library's float32 results
    with uvicorn_server(create_app(settings, encoder=encoder)) as url:
        yield url


@pytest.fixture
def client(server: str):
    with Client(server, timeout=60) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """`status` 0 accepts any 4xx."""
    if status:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 500, response.text
    err = response.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_error_5xx(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"code", "message"} and err["code"] == code and err["message"]
    return err


def test_health_ready_metrics(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["status"] == "ready"
    text = httpx.get(f"{server}/metrics").text
    assert 'loragen_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "loragen_cache_hits_total" in text and "loragen_generation_batch_size_bucket" in text
    assert "/v1/completions" in httpx.get(f"{server}/openapi.json").json()["paths"]


def test_readyz_waits_for_every_component(world: Path, encoder: TextEncoder) -> None:
    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home")
    app = create_app(settings, encoder=encoder)
    gate = threading.Event()
    app.state.service.engine.submit(gate.wait)  # the registry cannot load until the gate opens
    with uvicorn_server(app, wait_ready=False) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        err = assert_error_5xx(httpx.get(f"{url}/readyz"), 503, "not_ready")
        for component in ("registry", "encoder", "generators", "base_model"):
            assert component in err["message"]
        gate.set()
        deadline = time.monotonic() + 60
        while (r := httpx.get(f"{url}/readyz")).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.05)
        body = r.json()
        assert body["components"] == dict.fromkeys(("registry", "encoder", "generators", "base_model"), "ready")
        assert body["max_batch"] == settings.max_batch
        service = app.state.service
        assert service.completions.loaded and ("sg", 0) in service.pool.loaded()  # loaded, not lazily later


def test_readyz_names_what_failed(world: Path, encoder: TextEncoder, tmp_path: Path) -> None:
    spec = spec_from_config(world / "base", targets=["q_proj"], rank=4, base_model=str(tmp_path / "no-such-model"))
    Registry.create(tmp_path / "registry", spec, encoder=encoder).close()
    app = create_app(ApiSettings(registry=tmp_path / "registry", home=tmp_path / "home"), encoder=encoder)
    with uvicorn_server(app, wait_ready=False) as url:
        deadline = time.monotonic() + 60
        while "failed" not in (r := httpx.get(f"{url}/readyz")).text:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        err = assert_error_5xx(r, 503, "not_ready")
        message = err["message"]
        assert "base_model (failed:" in message and "no base model at" in message and "encoder" not in message
        assert r.headers["retry-after"] == "1"


def test_generate_matches_the_library_and_loads_in_peft(client: Client, world: Path, encoder: TextEncoder,
                                                        tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    description = "tell whether a review of a movie is positive"
    result = client.generate(description)
    assert result.neighbours[0].expert == "sentiment" and not result.cached
    assert abs(sum(n.weight for n in result.neighbours) - 1) < 1e-6
    assert (result.method, result.rank) == ("weighted", 4)
    assert Path(result.base_model).resolve() == (world / "base").resolve()
    reg = Registry.open(world / "registry", encoder=encoder)
    expected = load_generator("weighted", reg).generate([description])[0]
    reg.close()
    assert result.lora is not None
    for m in expected.spec.module_names:
        assert torch.equal(result.lora.B[m], expected.B[m]) and torch.equal(result.lora.A[m], expected.A[m])

    again = client.generate(description, download=False)
    assert again.cached and again.id == result.id and again.lora is None
    assert client.lora(result.id).neighbours == result.neighbours

    result.save_pretrained(tmp_path / "sdk")
    raw = httpx.post(f"{client.base_url}/v1/loras", json={"description": description},
                     headers={"Accept": "application/zip"})
    assert raw.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(raw.content)).extractall(tmp_path / "zip")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    base = BaseModel.load(world / "base")
    with result.lora.merged(base.model), torch.no_grad():
        want = base.model(ids).logits
    for directory in (tmp_path / "sdk", tmp_path / "zip"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)

    weights = httpx.post(f"{client.base_url}/v1/loras?format=safetensors", json={"description": description})
    assert set(load_safetensors(weights.content)) == set(result.lora.state_dict())
    assert 'loragen_cache_hits_total 0' not in httpx.get(f"{client.base_url}/metrics").text


def test_multitask_serves_the_registry_s_multitask_lora_for_any_description(client: Client, world: Path,
                                                                              encoder: TextEncoder) -> None:
    reg = Registry.open(world / "registry", encoder=encoder)
    want = load_multitask(reg)
    reg.close()
    results = [client.generate(d, method="multitask") for d in ("tell whether a review is positive", "anything")]
    for r in results:
        assert r.method == "multitask" and r.neighbours == [] and r.lora is not None
        assert all(torch.equal(r.lora.B[m], want.B[m]) and torch.equal(r.lora.A[m], want.A[m])
                   for m in want.spec.module_names)


def test_batch_equals_singles(client: Client) -> None:
    descriptions = ["sum two numbers given in words", "render an english phrase in french",
                    "implement a python function", "rate a film critique"]
    for method in ("weighted", "nearest"):
        singles = [client.generate(d, method=method) for d in descriptions]
        batch = client.generate_batch(descriptions, method=method, download=True)
        assert [b.id for b in batch] == [s.id for s in singles]
        for s, b in zip(singles, batch):
            # The text encoder pads a batch, which moves embeddings in the last float digits.
            assert [n.expert for n in s.neighbours] == [n.expert for n in b.neighbours]
            for ns, nb in zip(s.neighbours, b.neighbours):
                assert ns.similarity == pytest.approx(nb.similarity, abs=1e-5)
                assert ns.weight == pytest.approx(nb.weight, abs=1e-5)
            assert s.lora is not None and b.lora is not None
            for m in s.lora.spec.module_names:
                torch.testing.assert_close(b.lora.B[m], s.lora.B[m], rtol=1e-5, atol=1e-5)


def test_concurrent_generation_is_micro_batched(server: str, world: Path, encoder: TextEncoder) -> None:
    descriptions = [f"task number {i}: reverse a list of {i} words" for i in range(16)]

    async def run() -> list:
        async with AsyncClient(server) as ac:
            return await asyncio.gather(*(ac.generate(d, k=2) for d in descriptions))

    together = asyncio.run(run())
    reg = Registry.open(world / "registry", encoder=encoder)
    gen = load_generator("weighted", reg, k=2)
    for d, r in zip(descriptions, together):
        expected = gen.generate([d])[0]
        assert r.lora is not None
        assert [n.expert for n in r.neighbours] == [n["expert"] for n in expected.metadata["neighbours"]]
        # encoded in a batch, a description's embedding differs from its single encoding in float32
        # rounding, which softmax(sim / 0.05) amplifies to ~1e-6 in B on some CPUs
        for m in expected.spec.module_names:
            torch.testing.assert_close(r.lora.B[m], expected.B[m], rtol=0, atol=1e-5)
    reg.close()
    text = httpx.get(f"{server}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    # Some generator call decoded more than one request.
    assert values['loragen_generation_batch_size_bucket{le="1.0"}'] < values["loragen_generation_batch_size_count"]


def test_examples_reweigh_a_learned_method_s_neighbours(client: Client) -> None:
    examples = [{"input": "abc", "output": "cba"}, {"input": "hello", "output": "olleh"}]
    plain = client.generate("judge how positive a movie review is", method="sg", seed=1, download=False)
    assert all(n.example_logprob is None for n in plain.neighbours)
    result = client.generate("judge how positive a movie review is", method="sg", seed=1, examples=examples)
    assert result.lora is not None and result.lora.metadata["examples_used"] is True
    assert result.examples_used is True and 0 < result.examples_fit <= 1
    assert result.examples_ood == (result.examples_fit < 0.5) and plain.examples_fit is None
    logprobs = [n.example_logprob for n in result.neighbours]
    assert all(isinstance(x, float) and x < 0 for x in logprobs)
    # more candidates than the plain top K, which they extend
    assert len(result.neighbours) > len(plain.neighbours)
    assert [n.expert for n in result.neighbours[: len(plain.neighbours)]] == [n.expert for n in plain.neighbours]
    # weights softmax(sim/τ + log p(examples | expert)), τ read off the plain weights softmax(sim/τ)
    (a, b), sims = plain.neighbours[:2], [n.similarity for n in result.neighbours]
    tau = (a.similarity - b.similarity) / math.log(a.weight / b.weight)
    logits = torch.tensor(sims, dtype=torch.float64) / tau + torch.tensor(logprobs, dtype=torch.float64)
    alpha = torch.softmax(logits, 0)
    assert [n.weight for n in result.neighbours] == pytest.approx(alpha.tolist(), abs=1e-4)


def test_a_description_s_written_examples_are_used_and_reported(client: Client) -> None:
    written = client.generate("flip the word around, e.g. hello -> olleh", method="sg", seed=1, download=False)
    assert written.examples_used is True and written.examples_from_description is True
    assert all(isinstance(n.example_logprob, float) for n in written.neighbours)
    given = client.generate("flip the word around, e.g. hello -> olleh", method="sg", seed=1, download=False,
                            examples=[{"input": "hello", "output": "olleh"}])
    assert given.examples_used is True and given.examples_from_description is False
    assert [(n.expert, n.weight) for n in given.neighbours] == [(n.expert, n.weight) for n in written.neighbours]
    plain = client.generate("flip the word around", method="nearest", download=False)
    assert plain.examples_used is False and plain.examples_from_description is False


def test_generators_share_one_base_model_for_examples(world: Path, encoder: TextEncoder) -> None:
    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home",
                           encoder_dtype="float32")
    app = create_app(settings, encoder=encoder)
    examples = [{"input": "abc", "output": "cba"}]
    with uvicorn_server(app) as url, Client(url, timeout=60) as c:
        for method, k in (("sg", None), ("weighted", 2), ("weighted", 3)):
            assert c.generate("reverse the word", method=method, k=k, examples=examples, download=False).neighbours
        generators = list(app.state.service.pool.loaded().values())
    assert len(generators) >= 3 and len({id(g.task_vectors) for g in generators}) == 1
    assert "base" in vars(generators[0].task_vectors)  # loaded once, for all of them
    assert generators[0].task_vectors.base is app.state.service.base_model()  # the completions' own copy


def test_examples_and_completions_share_the_base_model_concurrently(server: str, client: Client) -> None:
    """Scoring examples hooks every candidate's LoRA onto the completions' model: the lock keeps each
    thread's hooks out of the other's forward passes, so concurrent results equal sequential ones."""
    lora_id = client.generate("english to french", download=False).id
    prompts = [f"abc{i}" for i in range(16)]
    examples = [{"input": "abc", "output": "cba"}, {"input": "hello", "output": "olleh"}]
    descriptions = [f"reverse the word {i}" for i in range(16)]
    texts = [client.complete(p, lora_id=lora_id, max_tokens=8).text for p in prompts]
    weights = [[n.weight for n in client.generate(d, method="sg", seed=0, examples=examples, download=False).neighbours]
               for d in descriptions]

    async def run() -> tuple[list, list]:
        async with AsyncClient(server) as ac:
            done = await asyncio.gather(*(ac.complete(p, lora_id=lora_id, max_tokens=8) for p in prompts),
                                        *(ac.generate(d, method="sg", seed=1, examples=examples, download=False)
                                              for d in descriptions))  # another seed: not from the cache
        return done[:len(prompts)], done[len(prompts):]

    completions, generated = asyncio.run(run())
    assert [c.text for c in completions] == texts
    assert not any(g.cached for g in generated)
    for got, want in zip(generated, weights):
        assert [n.weight for n in got.neighbours] == pytest.approx(want, abs=1e-6)


def test_a_compiled_decoder_is_compiled_at_warm_up_and_serves_the_same_loras(world: Path, encoder: TextEncoder) -> None:
    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home-compiled",
                           encoder_dtype="float32", compile_decoder=True, max_batch=2, max_wait_ms=50)
    app = create_app(settings, encoder=encoder)
    descriptions = ["english to french", "reverse the word", "arithmetic for kids"]
    with uvicorn_server(app) as url:  # ready once warm: padded batch sizes 1 and 2 compiled
        gen = app.state.service.pool.loaded()[("sg", 0)]
        assert gen.fused_decode.compiled is not None

        async def run() -> list:
            async with AsyncClient(url) as ac:
                return await asyncio.gather(*(ac.generate(d, method="sg", seed=2) for d in descriptions))

        served = asyncio.run(run())
    reg = Registry.open(world / "registry")
    eager = load_generator("sg", reg, generator_dir=world / "generators" / "sg").generate(descriptions, seed=2)
    for r, e in zip(served, eager):
        assert r.lora is not None
        for m in e.B:
            torch.testing.assert_close(r.lora.B[m], e.B[m], rtol=0, atol=1e-5)
    reg.close()


def test_learned_method_samples_seeds_and_cache(client: Client) -> None:
    description = "judge how positive a movie review is"
    result = client.generate(description, method="sg", seed=3, num_samples=2, download=False)
    assert (result.method, result.seed, len(result.sample_ids)) == ("sg", 3, 2)
    assert isinstance(result.ood, bool) and isinstance(result.clipped, bool) and isinstance(result.ambiguous, bool)
    first, second = (client.download(i).to_lora() for i in result.sample_ids)
    assert not torch.equal(first.B["self_attn.q_proj"], second.B["self_attn.q_proj"])
    again = client.generate(description, method="sg", seed=3, num_samples=2)
    assert again.cached and again.id == result.id and again.lora is not None
    assert torch.equal(again.lora.B["self_attn.q_proj"], first.B["self_attn.q_proj"])
    several = httpx.post(f"{client.base_url}/v1/loras?format=zip",
                         json={"description": description, "method": "sg", "num_samples": 2})
    assert_error(several, 400, "bad_request")  # several samples are not one zip
    unseeded = client.generate(description, method="sg", download=False)
    assert unseeded.seed is not None and not unseeded.cached
    replay = client.generate(description, method="sg", seed=unseeded.seed, download=False)
    assert replay.cached and replay.id == unseeded.id
    descriptions = ["translate to french please", "solve this sum", "write python code"]
    singles = [client.generate(d, method="sg", seed=5) for d in descriptions]
    batch = client.generate_batch(descriptions, method="sg", seed=5, download=True)
    for s, b in zip(singles, batch):
        assert s.id == b.id and s.lora is not None and b.lora is not None
        torch.testing.assert_close(b.lora.B["self_attn.v_proj"], s.lora.B["self_attn.v_proj"], rtol=1e-5, atol=1e-5)


def test_search_and_experts(client: Client) -> None:
    hits = client.search("translate this into french", k=2)
    assert [h.expert for h in hits][:1] == ["translate"] and len(hits) == 2
    # Ranked as sg ranks: the neighbours and similarities of its generation metadata.
    ranked = client.search("translate this into french", k=4, method="sg")
    meta = client.generate("translate this into french", method="sg", seed=0)
    assert [(h.expert, round(h.similarity, 5)) for h in ranked] == \
        [(n.expert, round(n.similarity, 5)) for n in meta.neighbours]
    with pytest.raises(BadRequestError, match="unknown method"):
        client.search("translate this into french", method="telepathy")
    page = client.experts.list(offset=1, limit=2)
    assert page.total == len(EXPERTS) and [e.name for e in page.data] == list(EXPERTS)[1:3]
    math = client.experts.get("math")
    assert client.experts.get(math.id) == math and math.descriptions == EXPERTS["math"]
    with pytest.raises(NotFoundError):
        client.experts.get("no-such-expert")


def test_concurrent_completions_equal_sequential(server: str, client: Client, world: Path) -> None:
    ids = [client.generate(d, download=False).id for d in
           ["positive or negative review", "english to french", "arithmetic for kids", "python from docstring"]]
    requests = [(f"abc{'xyz'[i % 3]}{i}", ids[i % 4]) for i in range(32)]
    sequential = [client.complete(p, lora_id=lid, max_tokens=8).text for p, lid in requests]

    async def run() -> list:
        async with AsyncClient(server) as ac:
            return await asyncio.gather(*(ac.complete(p, lora_id=lid, max_tokens=8) for p, lid in requests))

    concurrent = [c.text for c in asyncio.run(run())]
    assert concurrent == sequential
    text = httpx.get(f"{server}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    # Some forward decoded several requests, each with its own LoRA.
    assert values['loragen_completion_batch_size_bucket{le="1.0"}'] < values["loragen_completion_batch_size_count"]
    same_prompt = {client.complete("hello", lora_id=lid, max_tokens=8).text for lid in ids}
    assert len(same_prompt) > 1  # the LoRAs really change the output
    base = BaseModel.load(world / "base")
    lora = client.download(ids[1]).to_lora()
    expected = base.completions([requests[1][0]], loras=[lora], max_new_tokens=8, raw=True)[0]
    assert expected.text == sequential[1]
    assert client.complete(requests[1][0], lora_id=ids[1], max_tokens=8).finish_reason == expected.finish_reason
    assert client.complete(requests[1][0], lora_id=ids[1], max_tokens=1).finish_reason in {"stop", "length"}
    tiny = client.complete(requests[1][0], lora_id=ids[1], max_tokens=8, temperature=1e-30)
    assert tiny.text == sequential[1]  # a temperature too small to sample with decodes greedily
    by_description = client.complete("hello", description="english to french", max_tokens=8)
    assert by_description.lora_id == ids[1] and by_description.text in same_prompt


def test_the_openai_client_names_a_lora_as_its_model(server: str, client: Client, world: Path) -> None:
    """vLLM's way of serving LoRAs: /v1/models lists them, and a completion's `model` picks one."""
    import openai

    lora_id = client.generate("english to french", download=False).id
    oa = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in oa.models.list()}
    base = Registry.open(world / "registry").spec.base_model
    assert models[base].parent is None and models[lora_id].parent == base  # extra fields, as vLLM's
    done = oa.completions.create(model=lora_id, prompt="hello", max_tokens=8, temperature=0)
    ours = client.complete("hello", lora_id=lora_id, max_tokens=8)
    assert done.choices[0].text == ours.text and done.model == lora_id
    assert done.choices[0].finish_reason == ours.finish_reason
    usage = done.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 1 <= usage.completion_tokens <= 8
    if ours.finish_reason == "length":
        assert usage.completion_tokens == 8
    assert ours.usage == usage.model_dump(exclude_none=True)  # the SDK's Completion carries it too
    stop = ours.text[len(ours.text) // 2:][:1] or "a"
    cut = oa.completions.create(model=lora_id, prompt="hello", max_tokens=8, temperature=0, stop=[stop, "zz"])
    expected = BaseModel.load(world / "base").completions(["hello"], loras=[client.download(lora_id).to_lora()],
                                                          max_new_tokens=8, stop=[stop, "zz"], raw=True)[0]
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert cut.usage.completion_tokens == expected.completion_tokens
    plain = oa.completions.create(model=base, prompt="hello", max_tokens=8, temperature=0)
    assert plain.choices[0].text == client.complete("hello", max_tokens=8).text != ours.text
    with pytest.raises(openai.NotFoundError, match="neither the base model nor a LoRA"):
        oa.completions.create(model="lora-nowhere", prompt="hello", max_tokens=2, extra_body={"lora_id": "x"})
    with pytest.raises(openai.ConflictError, match="names the LoRA"):  # which LoRA is meant?
        oa.completions.create(model=lora_id, prompt="hello", max_tokens=2, extra_body={"description": "french"})
    same = oa.completions.create(model=lora_id, prompt="hello", max_tokens=8, extra_body={"lora_id": lora_id})
    assert same.choices[0].text == ours.text


def test_a_learned_method_without_a_trained_generator_is_404_without_server_paths(server: str) -> None:
    """The world trains sg only; icm is a method the schema lists, which this server does not have."""
    for path, body in (("/v1/loras", {"description": "x", "method": "icm"}),
                       ("/v1/loras/batch", {"descriptions": ["x"], "method": "icm"}),
                       ("/v1/search", {"description": "x", "method": "icm"})):
        err = assert_error(httpx.post(f"{server}{path}", json=body, timeout=60), 404, "not_found")
        assert "icm" in err["message"] and "/" not in err["message"].replace("GET /readyz", "")
    # JSON Schema's integers include 2.0; the server takes it as 2 (never a bool or 2.5)
    r = httpx.post(f"{server}/v1/loras", json={"description": "x", "k": 2.0, "seed": 3.0}, timeout=60)
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 2, r.text


def _peft_dir(world: Path, tmp_path: Path) -> Path:
    spec = spec_from_config(world / "base", targets=["q_proj", "v_proj"], rank=4, base_model=str(world / "base"))
    g = torch.Generator().manual_seed(7)
    A = {m.name: torch.randn(spec.num_layers, 4, m.in_features, generator=g) for m in spec.modules}
    B = {m.name: torch.randn(spec.num_layers, m.out_features, 4, generator=g) for m in spec.modules}
    return Lora(spec, A, B).save_pretrained(tmp_path / "adapter")


def _wrong_shapes(directory: Path) -> bytes:
    """The same keys as a good adapter, but lora_A reads 16 features where the model has 32."""
    tensors = load_safetensors((directory / "adapter_model.safetensors").read_bytes())
    return save_safetensors({k: torch.randn(4, 16) if ".lora_A." in k else v for k, v in tensors.items()})


def test_write_routes_need_a_key_and_uploads_are_checked(server: str, world: Path, tmp_path: Path) -> None:
    with Client(server) as anonymous, Client(server, api_key="wrong") as wrong, Client(server, api_key=KEY) as ok:
        for c, status in ((anonymous, 401), (wrong, 403)):
            with pytest.raises(AuthenticationError) as info:
                c.experts.delete("scratch")
            assert info.value.status == status
            with pytest.raises(AuthenticationError):
                c.experts.add(_peft_dir(world, tmp_path), "uploaded", ["a new task"])
        assert ok.experts.delete("scratch")["name"] == "scratch"
        with pytest.raises(NotFoundError):
            ok.experts.get("scratch")
        with pytest.raises(NotFoundError):
            ok.experts.delete("scratch")

        added = ok.experts.add(_peft_dir(world, tmp_path), "uploaded", ["spell words backwards"], tags=["up"])
        assert added.fidelity is not None and ok.experts.get("uploaded").tags == ["up"]
        assert ok.search("spell words backwards", k=1)[0].expert == "uploaded"
        with pytest.raises(ConflictError):
            ok.experts.add(_peft_dir(world, tmp_path), "uploaded", ["again"])
        before = ok.experts.list(limit=500).total
        config = (_peft_dir(world, tmp_path) / "adapter_config.json").read_bytes()
        bad_uploads = {
            "pickle": (b"\x80\x04\x95" + b"\x00" * 64, "adapter_model.bin"),
            "torch zip": (b"PK\x03\x04" + b"\x00" * 64, "adapter_model.safetensors"),
            "garbage": (b"not a safetensors file at all", "adapter_model.safetensors"),
            "wrong shapes": (_wrong_shapes(_peft_dir(world, tmp_path)), "adapter_model.safetensors"),
        }
        for what, (weights, filename) in bad_uploads.items():
            r = httpx.post(f"{server}/v1/experts", headers={"Authorization": f"Bearer {KEY}"},
                           data={"name": f"bad-{what}", "description": ["x"]},
                           files={"adapter_config": ("adapter_config.json", config),
                                  "adapter_model": (filename, weights)})
            assert 400 <= r.status_code < 500, (what, r.text)
            assert r.json()["error"]["message"]
        assert ok.experts.list(limit=500).total == before  # nothing half-written
        ok.experts.delete("uploaded")


def test_bad_adapter_configs_get_4xx_that_say_what_is_wrong(server: str, world: Path, tmp_path: Path) -> None:
    """Each upload is refused with a 4xx JSON error naming the problem, never a server-side path,
    and nothing is written. A 5,000-level nesting once raised RecursionError (a 500)."""
    import tempfile

    good = _peft_dir(world, tmp_path)
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()
    cases = {
        "nested": (b'{"r": ' + b"[" * 5000 + b"]" * 5000 + b"}", weights, "nested too deeply"),
        "nested object": (b'{"a": ' * 5000 + b"1" + b"}" * 5000, weights, "nested too deeply"),
        "not json": (b'{"r": 4', weights, "not valid JSON"),
        "long integer": (b'{"r": ' + b"9" * 5000 + b"}", weights, "not valid JSON"),
        "r as text": (json.dumps({**config, "r": "eight"}).encode(), weights, "'r' must be a positive integer"),
        "r as bool": (json.dumps({**config, "r": True}).encode(), weights, "'r' must be a positive integer"),
        "alpha as list": (json.dumps({**config, "lora_alpha": [1]}).encode(), weights, "'lora_alpha' must be"),
        "wrong rank": (json.dumps({**config, "r": 3}).encode(), weights, "do not have rank r=3"),
        "dora": (json.dumps({**config, "use_dora": True}).encode(), weights, "DoRA"),
        "truncated": (json.dumps(config).encode(), weights[:-7], "corrupt or truncated"),
        "wrong shapes": (json.dumps(config).encode(), _wrong_shapes(good), "does not match the base model"),
    }
    with httpx.Client(base_url=server, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as http:
        before = http.get("/v1/experts", params={"limit": 500}).json()["total"]
        for what, (config_bytes, weights_bytes, says) in cases.items():
            r = http.post("/v1/experts", data={"name": f"bad-{what}", "description": ["x"]},
                          files={"adapter_config": ("adapter_config.json", config_bytes),
                                 "adapter_model": ("adapter_model.safetensors", weights_bytes)})
            message = assert_error(r, 400, "invalid_adapter")["message"]
            assert says in message, (what, message)
            assert "the uploaded adapter" in message or what == "wrong shapes", (what, message)
            assert tempfile.gettempdir() not in message and "loragen-upload" not in message, (what, message)
        assert http.get("/v1/experts", params={"limit": 500}).json()["total"] == before


BAD_REQUESTS = [
    ("POST", "/v1/loras", {"json": {}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": ""}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "   "}}, 422, "invalid_request"),  # blank, as the schema says
    ("POST", "/v1/loras", {"json": {"description": "x" * 4001}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": 12}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "method": "magic"}}, 400, "unknown_method"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "method": "icm"}}, 404, "not_found"),  # not trained
    ("POST", "/v1/loras", {"json": {"description": "ok", "k": 2.5}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "num_samples": 17}}, 422, "invalid_request"),
    # No coercion: false is not 0, true is not 1, "3" is not 3 (the schema says integer).
    ("POST", "/v1/loras", {"json": {"description": "ok", "seed": False}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "k": True}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "seed": "3"}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "method": ""}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "examples": [{"input": "a"}]}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "examples": [{"x": "a", "y": "b"}]}}, 422,
     "invalid_request"),
    ("POST", "/v1/loras/batch", {"json": {"descriptions": ["a"], "seed": False}}, 422, "invalid_request"),
    ("POST", "/v1/loras/batch", {"json": {"descriptions": ["a"], "method": ""}}, 422, "invalid_request"),
    ("POST", "/v1/search", {"json": {"description": "ok", "method": ""}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "temperature": True}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "max_tokens": False}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "seed": False}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": {"description": "ok", "surprise": 1}}, 422, "invalid_request"),
    ("POST", "/v1/loras?format=pdf", {"json": {"description": "ok"}}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"json": ["description"]}, 422, "invalid_request"),
    ("POST", "/v1/loras", {"content": b'{"description": "ok"', "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("POST", "/v1/loras", {"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}},
     400, None),
    ("POST", "/v1/loras", {"content": b"x" * (2**20 + 1)}, 413, "payload_too_large"),
    ("POST", "/v1/search", {"json": {"description": "ok", "method": "icm"}}, 404, "not_found"),  # not trained
    ("POST", "/v1/search", {"json": {"description": "ok", "method": 3}}, 422, "invalid_request"),
    ("POST", "/v1/loras/batch", {"json": {"descriptions": ["a"] * 257}}, 422, "invalid_request"),
    ("POST", "/v1/loras/batch", {"json": {"descriptions": ["a", ""]}}, 422, "invalid_request"),
    ("POST", "/v1/loras/batch", {"json": {"descriptions": ["a", " "]}}, 422, "invalid_request"),
    ("GET", "/v1/loras/lora-unknown", {}, 404, "not_found"),
    ("GET", "/v1/loras/lora-unknown/adapter", {}, 404, "not_found"),
    ("GET", "/v1/experts/987654", {}, 404, "not_found"),
    ("GET", "/v1/experts?limit=0", {}, 422, "invalid_request"),
    ("GET", "/v1/experts/99999999999999999999999999", {}, 404, "not_found"),
    ("POST", "/v1/completions", {"content": b'{"prompt": "a", "temperature": NaN}',
                                 "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    ("POST", "/v1/search", {"json": {"description": "a", "k": 0}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "lora_id": "lora-unknown"}}, 404, "not_found"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "lora_id": "x", "description": "y"}}, 422, None),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "max_tokens": 0}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "model": "lora-unknown"}}, 404, "not_found"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "stop": [""]}}, 422, "invalid_request"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "model": "x", "description": "y"}}, 404, "not_found"),
    ("POST", "/v1/completions", {"json": {"prompt": "a", "max_tokens": 257}}, 422, "invalid_request"),
    ("POST", "/v1/experts", {"content": b"--x\r\ntruncated", "headers": {
        "content-type": "multipart/form-data; boundary=x", "authorization": f"Bearer {KEY}"}}, 0, None),
    ("GET", "/v1/nowhere", {}, 404, "not_found"),
    ("PUT", "/v1/loras", {}, 405, "method_not_allowed"),
    ("OPTIONS", "/v1/experts", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_4xx_json_errors(server: str, method: str, path: str, kwargs: dict, status: int,
                                          code: str | None) -> None:
    assert_error(httpx.request(method, f"{server}{path}", timeout=30, **kwargs), status, code)


def test_odd_ids_in_paths_are_404s(server: str) -> None:
    # %C2%B9 is "¹" and %D9%A3 an Arabic-Indic 3: digits to str.isdigit(), but not ids.
    odd = ["%00", "-1", "0", "%FF", "%F0%9F%98%80", "1.5", "%20", "a%2Fb", "x" * 3000, "9" * 40, "9" * 5000,
           "%C2%B9", "%D9%A3", "%EF%BC%93"]
    with httpx.Client(base_url=server, timeout=30, headers={"authorization": f"Bearer {KEY}"}) as http:
        for key in odd:
            for method, path in (("GET", f"/v1/experts/{key}"), ("DELETE", f"/v1/experts/{key}"),
                                 ("GET", f"/v1/loras/{key}"), ("GET", f"/v1/loras/{key}/adapter")):
                assert_error(http.request(method, path), 404)


def test_sdk_raises_typed_errors(client: Client) -> None:
    with pytest.raises(BadRequestError) as info:
        client.generate("ok", method="magic")
    assert info.value.code == "unknown_method" and "weighted" in info.value.message
    with pytest.raises(NotFoundError):
        client.lora("lora-unknown")


def _garbage(rng: random.Random) -> tuple[bytes, str]:
    """One malformed body: random bytes, wrong types, huge or broken strings, truncated JSON or multipart."""
    values = [None, 0, -1, 2**70, 1.5, float("nan"), "", "x" * 50_000, "\ud800", "\x00", [], {}, ["a"], [""],
              True, {"a": 1}, "weighted", "nearest", "zzz"]
    keys = ["description", "descriptions", "prompt", "k", "method", "seed", "num_samples", "lora_id",
            "max_tokens", "temperature", "examples", "name"]
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), "application/json"
    if kind == 1:
        body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randrange(1, 5))}
        return json.dumps(body).encode(), "application/json"
    if kind == 2:
        text = json.dumps({"description": "reverse the string", "k": 2})
        return text[: rng.randrange(1, len(text))].encode(), "application/json"
    if kind == 3:  # invalid UTF-8 inside a JSON string
        return b'{"description": "ab\xff\xfe\xc3(", "prompt": "\xed\xa0\x80"}', "application/json"
    if kind == 4:
        part = (b'--zz\r\nContent-Disposition: form-data; name="adapter_model"; filename="a.safetensors"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" + bytes(rng.randrange(256) for _ in range(64)))
        return part[: rng.randrange(10, len(part))], "multipart/form-data; boundary=zz"
    return json.dumps(rng.choice(values)).encode(), rng.choice(["application/json", "text/plain", ""])


def test_a_thousand_malformed_requests_never_give_5xx(server: str) -> None:
    rng = random.Random(0)
    routes = ["/v1/loras", "/v1/loras/batch", "/v1/search", "/v1/completions", "/v1/experts",
              "/v1/loras?format=zip", "/v1/loras?format=safetensors"]
    with httpx.Client(base_url=server, timeout=30) as http:
        for _ in range(1000):
            route = rng.choice(routes)
            body, content_type = _garbage(rng)
            headers = {"authorization": f"Bearer {KEY}"}
            if content_type:
                headers["content-type"] = content_type
            r = http.post(route, content=body, headers=headers)
            assert r.status_code < 500, (route, body[:80], r.status_code, r.text[:200])
            if r.status_code >= 400:  # a few draws are valid requests, e.g. {"descriptions": ["a"]}
                assert r.json()["error"]["code"]


def test_openapi_and_auth_on_every_route(world: Path, encoder: TextEncoder) -> None:
    from fastapi.testclient import TestClient

    settings = ApiSettings(registry=world / "registry", api_keys=[KEY], auth_all_routes=True)
    http = TestClient(create_app(settings, encoder=encoder))  # no lifespan: auth is checked first
    assert http.get("/healthz").json() == {"status": "ok"}  # probes need no key
    assert_error(http.get("/metrics"), 401, "unauthorized")
    assert_error(http.get("/v1/experts", headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    assert_error(http.get("/v1/experts", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert http.get("/healthz", headers={"Authorization": f"Bearer {KEY}"}).json() == {"status": "ok"}
    assert_error(http.get("/openapi.json"), 401, "unauthorized")
    assert_error(http.get("/docs"), 401, "unauthorized")
    assert http.get("/docs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    spec = http.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/loras", "/v1/loras/batch", "/v1/search", "/v1/experts", "/v1/completions"} <= set(spec["paths"])


def test_byte_lru_evicts_least_recent() -> None:
    from loragen.api.cache import ByteLRU

    cache: ByteLRU[str, int] = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # "b" is now the least recent
    cache.put("c", 3, 40)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and cache.size == 80
    assert not cache.put("huge", 4, 101) and "huge" not in cache
    assert (cache.hits, cache.misses) == (3, 0)


def test_client_retries_then_raises_on_connection_errors() -> None:
    import socket

    from loragen.client import LoragenConnectionError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.05) as c, pytest.raises(LoragenConnectionError):
        c.search("anything")
    assert time.monotonic() - started >= 0.15  # two backoffs: 0.05 + 0.1


def test_settings_from_environment_and_serve_command(monkeypatch: pytest.MonkeyPatch, world: Path) -> None:
    import uvicorn

    from loragen.cli.serve_cmds import serve

    monkeypatch.setenv("LORAGEN_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("LORAGEN_MAX_BATCH", "8")
    monkeypatch.setenv("LORAGEN_MAX_QUEUED_REQUESTS", "7")
    settings = ApiSettings()
    assert settings.api_keys == ["k1", "k2"] and settings.max_batch == 8 and not settings.auth_all_routes
    assert settings.max_queued_requests == 7
    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: seen.update(app=application, **kw))
    serve(registry=world / "registry", port=0, max_batch=4, auth_all_routes=True, request_timeout_s=9)
    assert seen["port"] == 0 and seen["host"] == "127.0.0.1"
    service = seen["app"].state.service
    assert service.settings.registry == world / "registry" and service.batcher.max_batch == 4
    assert service.settings.api_keys == ["k1", "k2"] and service.settings.auth_all_routes
    assert service.settings.max_queued_requests == 7 and service.settings.request_timeout_s == 9
