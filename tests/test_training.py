"""Expert training's causal loss: running a step in passes of similar length changes its cost, not its math."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loragen.adapters import Basis, LoraStack, Rows, applied, spec_from_config
from loragen.basemodel import BaseModel
from loragen.demo.world import build_tokenizer
from loragen.training import causal, experts
from loragen.training.causal import _passes, output_loss


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    return BaseModel(LlamaForCausalLM(cfg).eval(), tok, "tiny")


def _step(base, passes, block, task_rows, inputs, outputs):
    spec = spec_from_config(base.model.config.to_dict(), targets=["q_proj", "v_proj", "down_proj"], rank=4)
    basis = Basis.seeded(spec)
    gen = torch.Generator().manual_seed(1)
    B = {m.name: torch.nn.Parameter(0.1 * torch.randn(3, spec.num_layers, m.out_features, spec.rank, generator=gen))
         for m in spec.modules}
    blocked = []
    set_rows = Rows.set

    def spy(self, index, block=None):
        set_rows(self, index, block)
        blocked.append(self.blocks is not None)

    with applied(base.model, LoraStack(spec, dict(basis.A), B)) as rows:
        rows.set = spy.__get__(rows)
        loss = output_loss(base, inputs, outputs, passes=passes, rows=rows, task_rows=task_rows, block=block)
        loss.backward()
    return loss, {m: p.grad for m, p in B.items()}, blocked


def test_a_step_in_length_passes_has_the_one_pass_loss_and_gradient(base, monkeypatch):
    monkeypatch.setattr(causal, "MIN_ROWS_PER_PASS", 1)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 12))) for _ in range(24)]
    task_rows = [t for t in range(3) for _ in range(8)]  # three blocks of eight rows, one LoRA each
    outputs = [w[::-1] if t == 0 else w + w if t == 1 else w[:1] for w, t in zip(words, task_rows)]
    one_loss, one_grad, one_blocked = _step(base, 1, 8, task_rows, words, outputs)
    four_loss, four_grad, four_blocked = _step(base, 4, 8, task_rows, words, outputs)
    assert one_blocked == [True] and four_blocked == [True] * 4  # every pass keeps the bmm path
    torch.testing.assert_close(four_loss, one_loss, atol=1e-5, rtol=1e-5)
    for m in one_grad:
        torch.testing.assert_close(four_grad[m], one_grad[m], atol=1e-6, rtol=1e-4)
        assert one_grad[m].abs().sum() > 0


def test_without_loras_the_loss_is_transformers_mean_over_output_tokens(base, monkeypatch):
    monkeypatch.setattr(causal, "MIN_ROWS_PER_PASS", 1)
    words = ["abc", "defghijk", "lm", "nopqrstuvw", "xy", "zzzz"]
    outputs = [w[::-1] * (i % 3 + 1) for i, w in enumerate(words)]
    with torch.no_grad():
        reference = base.model(**base.encode_pairs(words, outputs)).loss
        for passes in (1, 3):
            torch.testing.assert_close(output_loss(base, words, outputs, passes=passes), reference)


def test_passes_cover_every_row_once_in_equal_one_lora_blocks_of_rising_length():
    rng = random.Random(2)
    lengths = [rng.randint(4, 30) for _ in range(48)]
    passes = _passes(lengths, 16, 4)
    assert sorted(i for part, _ in passes for i in part) == list(range(48))
    assert all(size == 4 for _, size in passes)
    for part, size in passes:
        assert all(len({i // 16 for i in part[k:k + size]}) == 1 for k in range(0, len(part), size))
    longest = [max(lengths[i] for i in part) for part, _ in passes]
    assert longest == sorted(longest)
    padded = sum(len(part) * top for (part, _), top in zip(passes, longest))
    assert padded < len(lengths) * max(lengths)
    # rows in no equal blocks: single rows, sorted by length
    assert _passes([3, 1, 2, 5, 4], 1, 2) == [([1, 2], 1), ([0, 4, 3], 1)]


def test_an_orthonormalized_basis_carries_every_b_to_the_same_delta_w():
    spec = spec_from_config({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}, targets=["q_proj", "down_proj"], rank=4)
    gen = torch.Generator().manual_seed(3)
    learned = Basis(spec, {m.name: torch.randn(spec.num_layers, spec.rank, m.in_features, generator=gen)
                           for m in spec.modules})
    B = {m.name: torch.randn(5, spec.num_layers, m.out_features, spec.rank, generator=gen) for m in spec.modules}
    basis, carry = learned.orthonormalized()
    for m, a in basis.A.items():
        eye = torch.eye(spec.rank).expand(spec.num_layers, -1, -1)
        torch.testing.assert_close(a @ a.transpose(1, 2), eye, atol=1e-6, rtol=0)
        before = B[m].double() @ learned.A[m].double()  # (E, L, out, in): float64 reference
        after = experts.carry_b(B[m], carry[m]).double() @ a.double()
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-5)


def _a_gradient(base, frozen, task_rows):
    spec = spec_from_config(base.model.config.to_dict(), targets=["q_proj", "v_proj"], rank=4)
    A = {m: torch.nn.Parameter(a.clone()) for m, a in Basis.seeded(spec).A.items()}
    gen = torch.Generator().manual_seed(1)
    B = {m.name: 0.1 * torch.randn(2, spec.num_layers, m.out_features, spec.rank, generator=gen) for m in spec.modules}
    words = ["abcd", "efgh", "ijkl", "mnop"]
    with applied(base.model, LoraStack(spec, A, B, a_frozen=frozen)) as rows:
        rows.set(task_rows, block=2)
        output_loss(base, words, [w[::-1] for w in words], rows=rows, task_rows=task_rows, block=2).backward()
    return {m: p.grad for m, p in A.items()}


def test_rows_of_a_frozen_lora_send_the_shared_a_no_gradient(base):
    both = _a_gradient(base, None, [0, 0, 1, 1])
    frozen = _a_gradient(base, torch.tensor([True, False]), [0, 0, 1, 1])
    alone = _a_gradient(base, torch.tensor([True, False]), [0, 0, 0, 0])  # every row frozen
    for m in both:
        assert not torch.allclose(frozen[m], both[m])
        assert alone[m] is None or alone[m].abs().max() == 0
    # each LoRA's rows give their own part of the gradient; together, all of it
    other = _a_gradient(base, torch.tensor([False, True]), [0, 0, 1, 1])
    for m in both:
        torch.testing.assert_close(frozen[m] + other[m], both[m], atol=1e-6, rtol=1e-4)


def test_experts_that_learn_the_basis_return_it_orthonormal_with_their_lora_in_it(base):
    from loragen.training.tasks import Instance, Task

    spec = spec_from_config(base.model.config.to_dict(), targets=["q_proj", "v_proj"], rank=4)
    seeded = Basis.seeded(spec)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(4)) for _ in range(20)]
    tasks = [Task(name=n, descriptions=[n], instances=[Instance(w, f(w)) for w in words])
             for n, f in (("reverse", lambda w: w[::-1]), ("first", lambda w: w[:1]))]
    config = experts.ExpertConfig(steps=3, rows_per_task=2, checkpoints=2, checkpoint_every=1, warmup=1,
                                  basis_lr=1e-2, basis_frozen_for=("first",))
    runs = causal.train_causal_experts(base, seeded, tasks, config)
    learned = runs[0].basis
    assert all(r.basis is learned for r in runs) and len(runs[0].checkpoints) == 2
    for m, a in learned.A.items():
        torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(spec.rank).expand_as(a @ a.transpose(1, 2)),
                                   atol=1e-6, rtol=0)
        assert not torch.allclose(learned.A[m].abs(), seeded.A[m].abs())
    assert runs[1].lora().A.keys() == learned.A.keys()


def test_two_one_thread_processes_train_the_experts_one_process_trains(base, tmp_path):
    """Every row here has as many output tokens as any other, so the two processes' row-weighted
    losses add up to the one process's loss exactly and only the order of float sums differs."""
    from loragen.training.tasks import Instance, Task

    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    saved = BaseModel.load(tmp_path / "base")
    spec = spec_from_config(saved.model.config.to_dict(), targets=["q_proj", "down_proj"], rank=4)
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(30)]
    tasks = [Task(name=n, descriptions=[n], instances=[Instance(w, f(w)) for w in words])
             for n, f in (("reverse", lambda w: w[::-1]), ("rotate", lambda w: w[1:] + w[0]),
                          ("swap", lambda w: w[1] + w[0] + w[2:]))]
    config = experts.ExpertConfig(steps=4, rows_per_task=4, checkpoints=2, checkpoint_every=2, warmup=1,
                                  basis_lr=1e-2, basis_frozen_for=("swap",), oversample={"reverse": 1})
    one = causal.train_causal_experts(saved, Basis.seeded(spec), tasks, config)
    two = causal.train_causal_experts(saved, Basis.seeded(spec), tasks, dataclasses.replace(config, workers=2))
    for a, b in zip(one, two):
        assert b.metrics.keys() == a.metrics.keys() == {"exact_match"}
        for ca, cb in zip(a.checkpoints, b.checkpoints):
            for m in ca:
                torch.testing.assert_close(cb[m], ca[m], atol=1e-5, rtol=1e-4)
                assert ca[m].abs().sum() > 0
    for m, a in one[0].basis.A.items():
        torch.testing.assert_close(two[0].basis.A[m], a, atol=1e-5, rtol=1e-4)


def _fails_in_process_1(group):
    import torch.distributed as dist

    if group.rank == 1:
        raise ValueError("process 1 fails")
    dist.barrier()


def test_a_failing_training_process_stops_the_others_with_its_exit_code():
    import time

    from loragen.training.parallel import run_parallel

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 1"):
        run_parallel(2, _fails_in_process_1)
    assert time.monotonic() - started < 60
