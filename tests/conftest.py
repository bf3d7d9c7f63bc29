from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch

TINY_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64},
    "mistral": {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64},
    "bert": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 64},
}

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    from loragen.adapters import load_config

    torch.manual_seed(seed)
    config = load_config(TINY_CONFIGS[arch])
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()


@pytest.fixture(scope="session")
def encoder():
    """The real packaged all-MiniLM-L6-v2, loaded once for the whole test run.
    `LORAGEN_TEST_ENCODER` points at a local copy where the package is not installed (the GPU box)."""
    from loragen.embeddings import TextEncoder

    enc = TextEncoder(os.environ.get("LORAGEN_TEST_ENCODER"))
    assert enc.dim == 384
    return enc


@pytest.fixture(scope="session", autouse=True)
def _loragen_home(tmp_path_factory):
    """One LORAGEN_HOME for the whole run (session fixtures such as the demo world included), a
    temporary one unless the caller set it (CI sets .ci-home)."""
    if "LORAGEN_HOME" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAGEN_HOME", str(tmp_path_factory.getbasetemp() / "home"))
        yield


def _needs(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Tests on the demo world run last, so that its build (`_demo_build`) overlaps the others: first
    those that need its experts only (they run while its second stage trains), then the rest."""
    whole = [item for item in items if _needs(item, "demo_world")]
    experts = [item for item in items if _needs(item, "demo_experts") and item not in set(whole)]
    if whole or experts:
        chosen = set(whole) | set(experts)
        items[:] = [item for item in items if item not in chosen] + experts + whole


@contextmanager
def _one_thread() -> Iterator[None]:
    """This process, and the subprocesses it starts, on one thread."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _demo_build(request, _loragen_home, tmp_path_factory):
    """When the run holds tests on the demo world and it is not built, `loragen demo build` starts
    in a child process as the run starts; the tests that need the world run last and wait for it.
    None when no test needs it or it is built."""
    from loragen.config import Settings
    from loragen.demo.background import BackgroundBuild
    from loragen.demo.world import DemoWorld

    home = Settings().home
    wanted = any(_needs(item, "demo_world") or _needs(item, "demo_experts") for item in request.session.items)
    if not wanted or DemoWorld(home / "demo").is_built():
        yield None
        return
    # One thread each for the build and the tests keeps the two from preempting each other's
    # OpenMP workers, and one thread does more work per core than two on this model. On one thread
    # the build gives the same base model, experts and multi-task LoRA, to the bit, as on two; the
    # tuned description encoder differs in its last bits, and the generators over it follow another path.
    build = BackgroundBuild(home, output=tmp_path_factory.getbasetemp() / "demo-build.log",
                            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, niceness=0)
    build.start()
    try:
        with _one_thread():
            yield build
    finally:
        build.stop()


def _wait_for_demo(build, done) -> None:  # type: ignore[no-untyped-def]
    """Until `done()`; the build's error (with the end of its output) if it ends first."""
    while build is not None and build.running and not done():
        time.sleep(0.5)
    if not done() and build is not None:
        try:
            build.wait()
        except Exception as exc:
            raise RuntimeError(f"{exc}\n{build.output.read_text(errors='replace')[-3000:]}") from exc
    assert done(), "the demo world's build ended without it"


@pytest.fixture(scope="session")
def demo_experts(_demo_build):
    """The demo world under LORAGEN_HOME once its first stage (base model, tasks, the registry's
    experts) is in place; its second stage may still be training."""
    from loragen.config import Settings
    from loragen.demo.world import DemoWorld

    world = DemoWorld(Settings().home / "demo")
    _wait_for_demo(_demo_build, world.has_experts)
    return world


@pytest.fixture(scope="session")
def demo_world(_demo_build):
    """The whole demo world under LORAGEN_HOME, built once for the run by `loragen demo build`."""
    from loragen.config import Settings
    from loragen.demo.world import DemoWorld

    world = DemoWorld(Settings().home / "demo")
    _wait_for_demo(_demo_build, world.is_built)
    return world


@contextmanager
def uvicorn_server(app, *, wait_ready: bool = True, timeout: float = 120) -> Iterator[str]:
    """`app` on a real uvicorn server on an ephemeral loopback port; yields its URL once /readyz is 200."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    while wait_ready and httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{url}/readyz").text
        time.sleep(0.05)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


# The API world's experts: random LoRAs under descriptions that the text encoder tells apart.
EXPERTS = {
    "sentiment": ["classify the sentiment of movie reviews as positive or negative",
                  "decide whether a film review is favourable"],
    "translate": ["translate english sentences into french", "convert english text to the french language"],
    "math": ["solve grade school arithmetic word problems", "answer simple maths questions for children"],
    "code": ["write python functions from a docstring", "generate python code implementing a function"],
    "scratch": ["an expert that the auth test deletes"],
}


def tiny_llama(directory):
    """A tiny random Llama with the demo tokenizer (and its chat template), saved in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loragen.demo.world import build_tokenizer

    tok = build_tokenizer(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def api_world_template(tmp_path_factory, encoder):
    """The API world, built once per run and never changed: tests get copies (`world`)."""
    from loragen.adapters import spec_from_config
    from loragen.generator import train_generator
    from loragen.registry import Registry
    from loragen.registry.multitask import save_multitask

    root = tmp_path_factory.mktemp("api-world-template")
    tiny_llama(root / "base")
    spec = spec_from_config(root / "base", targets=["q_proj", "v_proj"], rank=4, base_model=str(root / "base"))
    reg = Registry.create(root / "registry", spec, encoder=encoder)
    for i, (name, descriptions) in enumerate(EXPERTS.items()):
        g = torch.Generator().manual_seed(i)
        final = {m: torch.randn(b.shape, generator=g) for m, b in reg.basis.zeros_b().items()}
        checkpoints = [{m: b + 0.1 * torch.randn(b.shape, generator=g) for m, b in final.items()} for _ in range(2)]
        reg.add_expert(name, [*checkpoints, final], descriptions)
    train_generator(reg, "sg", out_dir=root / "generators" / "sg", epochs=1, batch=4, latent=16, hidden=64,
                    val_fraction=0.2, seed=0)
    g = torch.Generator().manual_seed(99)
    save_multitask(reg, reg.basis.lora({m: torch.randn(b.shape, generator=g) for m, b in reg.basis.zeros_b().items()},
                                       {"method": "multitask"}))
    reg.close()
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, api_world_template):
    """The API world: a tiny Llama, a registry of random experts over it (`EXPERTS`), a trained
    sg generator and a multitask LoRA; a module's own copy, so what its tests change stays in it
    (the base model is shared, read-only)."""
    import shutil

    root = tmp_path_factory.mktemp("api-world")
    for part in ("registry", "generators"):
        shutil.copytree(api_world_template / part, root / part)
    (root / "base").symlink_to(api_world_template / "base", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: float sums depend on the thread count, so a comparison with
    a process that runs one thread (a Ray worker) runs one here too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
