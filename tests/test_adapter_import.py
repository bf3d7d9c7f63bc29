"""Importing PEFT adapters: modules are matched by name and shape in any order, an adapter that
targets a subset of the registry's modules imports with zero ΔW on the rest (and says which), and
one with a module the registry lacks is refused by name. Adapters written by loragen and by PEFT
itself go through the library, the CLI and `POST /v1/experts` on a real server; the imported
deltas are checked against PEFT's own ΔW projected onto the registry's basis."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TARGETS, TINY_CONFIGS, tiny_llama, tiny_model, uvicorn_server
from typer.testing import CliRunner

from loragen.adapters import Lora, LoraSpec, ModuleSpec, spec_from_config
from loragen.api import ApiSettings, create_app
from loragen.client import Client
from loragen.embeddings import TextEncoder
from loragen.registry import Registry, RegistryError

SEVEN = TARGETS["llama"]  # q, k, v, o, gate, up, down
SUBSET = ["q_proj", "v_proj"]
KEY = "import-key"
SRC = Path(__file__).resolve().parents[1] / "src"

Deltas = dict[str, torch.Tensor]  # module name -> (L, out, in)


def peft_adapter(model: torch.nn.Module, targets: list[str], directory: Path, seed: int) -> Deltas:
    """`get_peft_model` + `save_pretrained` with non-zero weights; returns PEFT's own ΔW per module."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(directory)
    per_layer: dict[str, dict[int, torch.Tensor]] = {}
    for path, module in peft.named_modules():
        if isinstance(module, LoraLayer):
            _, _, rest = path.partition(".layers.")  # base_model.model.model.layers.<n>.<module>
            number, _, rel = rest.partition(".")
            per_layer.setdefault(rel, {})[int(number)] = module.get_delta_weight("default").detach().float()
    return {rel: torch.stack([d[i] for i in sorted(d)]) for rel, d in per_layer.items()}


def loragen_adapter(spec: LoraSpec, directory: Path, seed: int) -> Deltas:
    """loragen's own `save_pretrained` output (what `loragen generate` writes); returns its ΔW."""
    g = torch.Generator().manual_seed(seed)
    s = spec.with_rank(4, alpha=8)
    A = {m.name: torch.randn(s.num_layers, 4, m.in_features, generator=g) * 0.3 for m in s.modules}
    B = {m.name: torch.randn(s.num_layers, m.out_features, 4, generator=g) * 0.3 for m in s.modules}
    lora = Lora(s, A, B)
    lora.save_pretrained(directory)
    return {m: lora.delta(m) for m in s.module_names}


def check_import(reg: Registry, name: str, want: Deltas) -> None:
    """The expert's ΔW is PEFT's ΔW projected onto the basis (ΔW A₀ᵀ A₀), zero where it had none;
    its kept source is the adapter's ΔW itself."""
    e = reg.get(name)
    lora, source = reg.lora(e), reg.source(e)
    assert source is not None
    for m in reg.spec.module_names:
        got = lora.delta(m).double()
        if m not in want:
            assert not got.any(), m
            assert not source.delta(m).any(), m
            continue
        a0 = reg.basis.A[m].double()
        projected = want[m].double() @ a0.transpose(-1, -2) @ a0
        assert want[m].abs().max() > 0
        torch.testing.assert_close(got, projected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(source.delta(m).double(), want[m].double(), rtol=1e-5, atol=1e-6)


def full_names(short: list[str]) -> list[str]:
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=SEVEN, rank=4)
    return [m for m in spec.module_names if m.rsplit(".", 1)[-1] in short]


def with_extra_module(spec: LoraSpec) -> LoraSpec:
    """`spec` plus a module no Llama has."""
    first = spec.modules[0]
    return replace(spec, modules=(*spec.modules, ModuleSpec("self_attn.x_proj", first.in_features, first.out_features)))


# ---------------------------------------------------------------------------------- the library


@pytest.fixture
def reg7(tmp_path: Path, encoder: TextEncoder) -> Registry:
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=SEVEN, rank=4)
    return Registry.create(tmp_path / "reg", spec, encoder=encoder)


@pytest.mark.parametrize("targets", [SEVEN, SUBSET], ids=["seven", "subset"])
@pytest.mark.parametrize("writer", ["peft", "loragen"])
def test_adapters_import_whatever_their_module_order(reg7: Registry, tmp_path: Path, writer: str,
                                                     targets: list[str]) -> None:
    directory = tmp_path / "adapter"
    if writer == "peft":
        want = peft_adapter(tiny_model("llama"), targets, directory, seed=1)
    else:
        want = loragen_adapter(spec_from_config(TINY_CONFIGS["llama"], targets=targets, rank=4), directory, seed=1)
    read = Lora.from_pretrained(directory)
    assert sorted(read.spec.module_names) == sorted(full_names(targets))
    # The order of an adapter's modules is not part of it (PEFT writes target_modules from a set).
    backwards = {m: -i for i, m in enumerate(reg7.spec.module_names)}
    lora = Lora(replace(read.spec, modules=tuple(sorted(read.spec.modules, key=lambda m: backwards[m.name]))),
                read.A, read.B)
    assert lora.spec.module_names == [m for m in reg7.spec.module_names[::-1] if m in want]
    expert, projection = reg7.import_adapter(lora, "x", ["a task"])
    absent = [m for m in reg7.spec.module_names if m not in want]
    assert list(projection.absent_modules) == absent
    assert expert.fidelity == pytest.approx(projection.fidelity)
    check_import(reg7, "x", want)


def test_unknown_modules_are_refused_by_name(reg7: Registry, tmp_path: Path) -> None:
    spec = with_extra_module(spec_from_config(TINY_CONFIGS["llama"], targets=SUBSET, rank=4))
    loragen_adapter(spec, tmp_path / "odd", seed=2)
    before = reg7.fingerprint()
    with pytest.raises(RegistryError, match=r"does not match the base model: it targets self_attn\.x_proj"):
        reg7.import_adapter(Lora.from_pretrained(tmp_path / "odd"), "odd", ["a task"])
    assert reg7.experts() == [] and reg7.fingerprint() == before


# ---------------------------------------------------------------------------------- the CLI


def test_cli_imports_subsets_and_refuses_unknown_modules(reg7: Registry, tmp_path: Path, encoder: TextEncoder,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from loragen.cli import registry_cmds

    monkeypatch.setattr("loragen.embeddings.text.TextEncoder._model", encoder._model, raising=False)
    spec7 = spec_from_config(TINY_CONFIGS["llama"], targets=SEVEN, rank=4)
    adapters = {
        "peft-seven": peft_adapter(tiny_model("llama"), SEVEN, tmp_path / "peft-seven", seed=3),
        "peft-qv": peft_adapter(tiny_model("llama"), SUBSET, tmp_path / "peft-qv", seed=4),
        "loragen-seven": loragen_adapter(spec7, tmp_path / "loragen-seven", seed=5),
        "loragen-qv": loragen_adapter(spec_from_config(TINY_CONFIGS["llama"], targets=SUBSET, rank=4),
                                      tmp_path / "loragen-qv", seed=6),
    }
    runner = CliRunner()
    for name in adapters:
        res = runner.invoke(registry_cmds.app, ["add", str(tmp_path / name), "-d", f"task {name}", "--name", name,
                                                "--registry", str(reg7.path)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        line = res.output.strip().splitlines()[0]
        assert line.startswith(f"added {name}: fidelity ")
        if name.endswith("-qv"):
            absent = [m for m in spec7.module_names if m not in full_names(SUBSET)]
            assert line.endswith("absent modules (zero ΔW): " + ", ".join(absent)), line
        else:
            assert "absent" not in line
    reopened = Registry.open(reg7.path, encoder=encoder)
    for name, want in adapters.items():
        check_import(reopened, name, want)

    # A module the registry lacks: one line naming it, a non-zero exit, nothing written.
    loragen_adapter(with_extra_module(spec7), tmp_path / "odd", seed=7)
    before = reopened.fingerprint()
    proc = subprocess.run([sys.executable, "-m", "loragen.cli", "registry", "add", str(tmp_path / "odd"), "-d", "x",
                           "--registry", str(reg7.path)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "self_attn.x_proj" in lines[0]
    assert Registry.open(reg7.path, encoder=encoder).fingerprint() == before


# ---------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api_world(tmp_path_factory: pytest.TempPathFactory, encoder: TextEncoder) -> Path:
    """A tiny Llama with the demo tokenizer and an empty registry on all seven projections."""
    root = tmp_path_factory.mktemp("import-world")
    tiny_llama(root / "base")
    spec = spec_from_config(root / "base", targets=SEVEN, rank=4, base_model=str(root / "base"))
    Registry.create(root / "registry", spec, encoder=encoder).close()
    return root


def test_uploads_import_subsets_and_refuse_unknown_modules(api_world: Path, encoder: TextEncoder,
                                                           tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    base = api_world / "base"
    spec7 = spec_from_config(base, targets=SEVEN, rank=4, base_model=str(base))
    adapters = {
        "peft-seven": peft_adapter(LlamaForCausalLM.from_pretrained(base), SEVEN, tmp_path / "peft-seven", seed=8),
        "peft-qv": peft_adapter(LlamaForCausalLM.from_pretrained(base), SUBSET, tmp_path / "peft-qv", seed=9),
        "loragen-seven": loragen_adapter(spec7, tmp_path / "loragen-seven", seed=10),
        "loragen-qv": loragen_adapter(spec_from_config(base, targets=SUBSET, rank=4, base_model=str(base)),
                                      tmp_path / "loragen-qv", seed=11),
    }
    loragen_adapter(with_extra_module(spec7), tmp_path / "odd", seed=12)
    settings = ApiSettings(registry=api_world / "registry", home=api_world / "home", api_keys=[KEY],
                           encoder_dtype="float32")
    with uvicorn_server(create_app(settings, encoder=encoder)) as url, Client(url, api_key=KEY, timeout=120) as c:
        for name in adapters:
            added = c.experts.add(tmp_path / name, name, [f"task {name}"])
            absent = [m for m in spec7.module_names if m not in adapters[name]]
            assert added.name == name and added.absent_modules == absent
            assert added.fidelity is not None
        before = c.experts.list(limit=500).total
        files = {"adapter_config": ("adapter_config.json", (tmp_path / "odd" / "adapter_config.json").read_bytes()),
                 "adapter_model": ("adapter_model.safetensors",
                                   (tmp_path / "odd" / "adapter_model.safetensors").read_bytes())}
        r = httpx.post(f"{url}/v1/experts", headers={"Authorization": f"Bearer {KEY}"},
                       data={"name": "odd", "description": ["x"]}, files=files, timeout=120)
        assert r.status_code == 400, r.text
        assert "self_attn.x_proj" in r.json()["error"]["message"]
        assert c.experts.list(limit=500).total == before
    reg = Registry.open(api_world / "registry", encoder=encoder)
    for name, want in adapters.items():
        check_import(reg, name, want)
    reg.close()


def test_schema_documents_absent_modules() -> None:
    spec = create_app(ApiSettings(api_keys=[KEY])).openapi()
    answer = spec["paths"]["/v1/experts"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    name = answer["$ref"].rsplit("/", 1)[-1]
    assert "absent_modules" in spec["components"]["schemas"][name]["properties"]


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    """The first byte of a safetensors file is its header length's low byte, 0x80 for some
    adapters (PEFT's own output included); only bytes that are not safetensors-shaped are sniffed."""
    from safetensors.torch import save

    from loragen.api.payloads import looks_like_pickle, read_upload

    spec = spec_from_config(TINY_CONFIGS["llama"], targets=SUBSET, rank=4)
    loragen_adapter(spec, tmp_path / "a", seed=13)
    tensors = Lora.from_pretrained(tmp_path / "a").state_dict()
    data = next(d for n in range(256) if (d := save(tensors, metadata={"pad": "x" * n}))[0] == 0x80)
    assert not looks_like_pickle(data, "adapter_model.safetensors")
    lora = read_upload((tmp_path / "a" / "adapter_config.json").read_bytes(), data, "adapter_model.safetensors")
    assert sorted(lora.spec.module_names) == sorted(spec.module_names)
    assert looks_like_pickle(b"\x80\x04\x95" + b"\x00" * 64, "adapter_model.safetensors")
    assert looks_like_pickle(b"PK\x03\x04" + b"\x00" * 64, "adapter_model.safetensors")
    assert looks_like_pickle(data, "adapter_model.bin")


def test_sigkilled_server_keeps_whole_uploads_only(api_world: Path, encoder: TextEncoder, tmp_path: Path) -> None:
    """`loragen serve` killed with SIGKILL while uploads of subset adapters stream in: every
    acknowledged expert survives whole (zero ΔW on its absent modules), at most the one in
    flight is added besides, and the registry opens with its index in step with SQLite."""
    import os
    import random
    import shutil
    import signal
    import socket
    import threading
    import time

    from loragen.client.types import adapter_upload

    registry = tmp_path / "registry"
    shutil.copytree(api_world / "registry", registry)
    reg = Registry.open(registry, encoder=encoder)
    earlier = {e.name for e in reg.experts()}  # other tests' uploads to the shared world
    reg.close()
    base = api_world / "base"
    spec_qv = spec_from_config(base, targets=SUBSET, rank=4, base_model=str(base))
    adapter = tmp_path / "qv"
    loragen_adapter(spec_qv, adapter, seed=14)
    files = adapter_upload(adapter)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "LORAGEN_HOME": str(tmp_path / "home")}
    rng = random.Random(5)
    acknowledged: list[str] = []
    for rnd in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "loragen.cli", "serve", "--registry", str(registry),
                                 "--port", str(port), "--log-level", "warning"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)

            def upload(name: str) -> int:
                r = httpx.post(f"{url}/v1/experts", data={"name": name, "description": [f"task {name}"]},
                               files=files, timeout=60)
                return r.status_code

            for i in range(rng.randrange(2, 5)):
                name = f"r{rnd}-{i}"
                assert upload(name) == 201
                acknowledged.append(name)
            in_flight = f"r{rnd}-killed"
            threading.Thread(target=lambda: _swallow(upload, in_flight), daemon=True).start()
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        reg = Registry.open(registry, encoder=encoder)
        names = {e.name for e in reg.experts()} - earlier
        assert set(acknowledged) <= names and names - set(acknowledged) <= {in_flight}
        if in_flight in names:
            acknowledged.append(in_flight)
        for e in (e for e in reg.experts() if e.name in names):
            lora = reg.lora(e)
            assert e.descriptions == [f"task {e.name}"] and reg.source(e) is not None
            for m in reg.spec.module_names:
                assert lora.delta(m).any() == (m in spec_qv.module_names), (e.name, m)
        assert sorted(reg.index.ids().tolist()) == reg.store.embeddings(reg.dim)[0].tolist()
        reg.close()


def _swallow(fn, *args) -> None:  # type: ignore[no-untyped-def]
    """Run `fn`; the server being killed under it is expected."""
    try:
        fn(*args)
    except httpx.HTTPError:
        pass
