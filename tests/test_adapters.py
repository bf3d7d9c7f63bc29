from __future__ import annotations

import json

import pytest
import torch
from conftest import TARGETS, TINY_CONFIGS, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

from loragen.adapters import AdapterFormatError, Basis, Lora, LoraStack, applied, spec_from_config


def random_lora(spec, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    A = {m.name: torch.randn(spec.num_layers, spec.rank, m.in_features, generator=g) * scale for m in spec.modules}
    B = {m.name: torch.randn(spec.num_layers, m.out_features, spec.rank, generator=g) * scale for m in spec.modules}
    return Lora(spec, A, B)


def forward(model, arch, ids):
    out = model(input_ids=ids)
    return out.last_hidden_state if arch == "bert" else out.logits


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_spec_matches_the_modules_peft_wraps(arch):
    spec = spec_from_config(TINY_CONFIGS[arch], targets=TARGETS[arch], rank=4)
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=spec.target_modules,
                                                         fan_in_fan_out=spec.fan_in_fan_out))
    wrapped = {n: mod for n, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    expected = {
        f"base_model.model.{spec.module_path(layer, m.name)}": m
        for m in spec.modules for layer in range(spec.num_layers)
    }
    assert set(wrapped) == set(expected)
    for name, m in expected.items():
        mod = wrapped[name]
        assert tuple(mod.lora_A["default"].weight.shape) == (4, m.in_features)
        assert tuple(mod.lora_B["default"].weight.shape) == (m.out_features, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_peft_loads_our_adapter_and_agrees_with_our_merge(arch, tmp_path):
    spec = spec_from_config(TINY_CONFIGS[arch], targets=TARGETS[arch], rank=4, alpha=8)
    lora = random_lora(spec)
    lora.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and not config["use_dora"]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    # float64 on both sides, so the comparison checks the math rather than float32 rounding.
    peft_model = PeftModel.from_pretrained(tiny_model(arch).double(), tmp_path / "a").double().eval()
    with torch.no_grad():
        want = forward(peft_model, arch, ids)
        ours_model = tiny_model(arch).double()
        base = forward(ours_model, arch, ids)
        lora.merge_into(ours_model)
        got = forward(ours_model, arch, ids)
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_application_equals_merging(arch):
    spec = spec_from_config(TINY_CONFIGS[arch], targets=TARGETS[arch], rank=4)
    loras = [random_lora(spec, seed=s) for s in range(3)]
    model = tiny_model(arch)
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with applied(model, LoraStack.from_loras(loras)) as rows:
            rows.set([2, 0, -1, 1])
            got = forward(model, arch, ids)
        for row, which in enumerate([2, 0, None, 1]):
            if which is None:
                want = forward(model, arch, ids[row:row + 1])
            else:
                with loras[which].merged(model):
                    want = forward(model, arch, ids[row:row + 1])
            torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)


def test_merge_then_unmerge_restores_weights_exactly():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=TARGETS["llama"], rank=4)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = random_lora(spec).merge_into(model)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.unmerge()
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_delta_matches_float64_reference():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4, alpha=12, use_rslora=True)
    lora = random_lora(spec)
    m = spec.modules[0].name
    ref = (12 / 2.0) * lora.B[m][1].double() @ lora.A[m][1].double()
    torch.testing.assert_close(lora.delta(m, 1).double(), ref, atol=1e-5, rtol=1e-5)


def test_roundtrip_and_spec_recovered_from_the_adapter(tmp_path):
    spec = spec_from_config(TINY_CONFIGS["gpt2"], targets=TARGETS["gpt2"], rank=4)
    lora = random_lora(spec)
    lora.save_pretrained(tmp_path / "a")
    back = Lora.from_pretrained(tmp_path / "a")
    assert back.spec.shape_key() == spec.shape_key()
    for m in spec.module_names:
        assert torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m])


def test_projection_is_exact_when_a_lies_in_the_basis():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "v_proj"], rank=4)
    basis = Basis.seeded(spec, seed=3)
    g = torch.Generator().manual_seed(0)
    A, B = {}, {}
    for m in spec.modules:  # A = M A₀ with a random invertible M: same row space, other factors
        mix = torch.randn(spec.num_layers, 4, 4, generator=g)
        A[m.name] = mix @ basis.A[m.name]
        B[m.name] = torch.randn(spec.num_layers, m.out_features, 4, generator=g)
    foreign = Lora(spec.with_rank(4, alpha=7), A, B)
    proj = basis.project(foreign)
    assert proj.relative_error < 1e-5
    rebuilt = basis.lora(proj.B)
    for m in spec.module_names:
        torch.testing.assert_close(rebuilt.delta(m), foreign.delta(m), atol=1e-4, rtol=1e-4)


def test_projection_of_a_random_adapter_reports_its_loss():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4)
    proj = Basis.seeded(spec).project(random_lora(spec, seed=5))
    # A random rank-4 basis of a width-32 input keeps roughly 4/32 of the energy.
    assert 0.8 < proj.relative_error < 1.0


def test_rebase_at_the_sum_of_ranks_keeps_every_delta():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "down_proj"], rank=4)
    experts = [random_lora(spec, seed=s) for s in range(3)]
    basis = Basis.rebased(spec, experts, rank=12)
    assert basis.spec.rank == 12
    for e in experts:
        proj = basis.project(e)
        assert proj.relative_error < 1e-5
        rebuilt = basis.lora(proj.B)
        for m in spec.module_names:
            ref = e.delta(m).double()
            err = (rebuilt.delta(m).double() - ref).norm() / ref.norm()
            assert err < 1e-5


def test_rebase_is_deterministic_and_orthonormal():
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4)
    experts = [random_lora(spec, seed=s) for s in range(2)]
    a = Basis.rebased(spec, experts, rank=6)
    b = Basis.rebased(spec, experts, rank=6)
    assert a.sha256() == b.sha256()
    A = a.A[spec.module_names[0]].double()
    torch.testing.assert_close(A @ A.transpose(1, 2), torch.eye(6, dtype=torch.float64).expand(2, 6, 6))


def test_pickle_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        Lora.from_pretrained(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path):
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4)
    random_lora(spec).save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        Lora.from_pretrained(tmp_path / "a")


def test_dora_is_refused(tmp_path):
    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj"], rank=4)
    random_lora(spec).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        Lora.from_pretrained(tmp_path / "a")


def test_blocked_rows_take_the_bmm_path_and_agree_with_gathering():
    from loragen.adapters import Rows

    spec = spec_from_config(TINY_CONFIGS["llama"], targets=["q_proj", "down_proj"], rank=4)
    basis = Basis.seeded(spec)
    loras = [basis.lora(random_lora(spec, seed=s).B) for s in range(3)]
    stack = LoraStack(spec, dict(basis.A), {m: torch.stack([lo.B[m] for lo in loras]) for m in spec.module_names})
    model = tiny_model("llama")
    ids = torch.randint(0, 64, (6, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), applied(model, stack) as rows:
        rows.set([2, 2, 0, 0, 1, 1])
        assert rows.blocks is not None
        blocked = forward(model, "llama", ids)
        rows.set([2, 2, 0, 0, 1, -1])
        assert rows.blocks is None
        gathered = forward(model, "llama", ids)
    torch.testing.assert_close(blocked[:5], gathered[:5], atol=1e-5, rtol=1e-5)
    assert isinstance(rows, Rows)


@pytest.mark.parametrize("block", [4, 1, None], ids=["bmm-blocks", "bmm-rows", "gather"])
def test_gradients_through_repeated_loras_are_the_same_from_run_to_run(block):
    """Rows of one LoRA in several blocks (or rows): their gradients meet in that LoRA's B, and are
    added in the same order every time (expert training repeats bit for bit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loragen.adapters import Rows

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval().requires_grad_(False)
    spec = spec_from_config(model.config.to_dict(), targets=["q_proj", "down_proj"], rank=16)
    gen = torch.Generator().manual_seed(1)
    B = {m.name: torch.nn.Parameter(0.1 * torch.randn(21, 1, m.out_features, 16, generator=gen)) for m in spec.modules}
    ids = torch.randint(0, 64, (84, 12), generator=gen)
    index = [t for t in torch.randint(0, 21, (21,), generator=gen).tolist() for _ in range(4)]  # LoRAs repeat
    grads = []
    with applied(model, LoraStack(spec, dict(Basis.seeded(spec).A), B)) as rows:
        for _ in range(8):
            rows.set(index, block=block) if block else rows.set(index[:-1] + [-1])
            assert (rows.blocks is not None) == bool(block)
            model(input_ids=ids).logits.square().mean().backward()
            grads.append({m: p.grad.clone() for m, p in B.items()})
            for p in B.values():
                p.grad = None
    for g in grads[1:]:
        assert all(torch.equal(g[m], grads[0][m]) for m in B)
