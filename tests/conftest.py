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
