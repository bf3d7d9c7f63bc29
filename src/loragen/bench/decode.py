"""`loragen bench decode`: fused decoding vs a Text-to-LoRA-style loop.

The model is an ICM-LoRA CVAE with random weights and random normalisation statistics, wrapped in a
`LearnedGenerator` so that the fused timing runs `LearnedGenerator.decode`, the very code that
`generate()` uses. The naive baseline decodes one request at a time and one (layer, module) token
per forward, with the same weights. End to end adds the real text encoder and a FAISS search.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ..adapters import LoraSpec
from ..errors import LoragenError
from ..registry import Registry
from ..registry.index import normalised
from ..generator.config import CheckpointConfig, GeneratorConfig
from ..generator.cvae import CVAEConfig, LoraCVAE
from ..generator.decoder import TokenLayout
from ..generator.learned import LearnedGenerator
from ..generator.safety import Safety

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONDITION_DIM = 384  # all-MiniLM-L6-v2, the registry's default encoder


class BenchError(LoragenError, ValueError):
    """The benchmark cannot run as asked."""


@dataclass
class BenchConfig:
    batches: list[int]
    device: str = "cpu"
    dtype: str = "auto"  # bf16 on cuda, fp32 on cpu
    repeats: int = 5
    warmup: int = 1
    hidden: int = 512
    latent: int = 256
    naive_max: int = 8  # the naive loop is timed on min(batch, naive_max) requests
    registry_size: int = 1000
    top_k: int = 4
    end_to_end: bool = True
    encoder: str | None = None  # a local sentence-transformers dir; default: packaged MiniLM
    compile: bool = False  # also time torch.compile of the fused decode (CUDA graphs on cuda)
    seed: int = 0

    def torch_dtype(self) -> torch.dtype:
        name = self.dtype if self.dtype != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        return DTYPES[name]


def check_config(cfg: BenchConfig) -> None:
    if not cfg.batches or any(b < 1 for b in cfg.batches):
        raise BenchError(f"batch sizes must be positive integers, got {cfg.batches}")
    if cfg.device not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {cfg.device!r}; choose cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but CUDA is not available here")
    if cfg.dtype not in ("auto", *DTYPES):
        raise BenchError(f"unknown dtype {cfg.dtype!r}; choose auto, {', '.join(DTYPES)}")
    if cfg.device == "cpu" and cfg.torch_dtype() != torch.float32:
        raise BenchError("on cpu the benchmark runs in fp32 only")
    if cfg.repeats < 1 or cfg.naive_max < 1 or cfg.registry_size < cfg.top_k:
        raise BenchError("repeats and naive_max must be >= 1, registry_size >= top_k")


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise BenchError(f"--batch takes comma-separated positive integers, got {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise BenchError(f"--batch takes comma-separated positive integers, got {text!r}")
    return batches


# ------------------------------------------------------------------------ the model

def build_generator(spec: LoraSpec, *, hidden: int = 512, latent: int = 256, condition_dim: int = CONDITION_DIM,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> LearnedGenerator:
    """An ICM-LoRA generator with random weights and statistics; only `decode()` is usable on it."""
    layout = TokenLayout(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LoraCVAE(layout, CVAEConfig(method="icm", latent=latent, hidden=hidden), condition_dim)
    model.set_stats([0.01 * torch.randn(len(g.tokens), generator=gen) for g in layout.groups],
                    [0.01 + 0.01 * torch.rand(len(g.tokens), generator=gen) for g in layout.groups])
    # The norm range never clips, but end to end still pays for the norm computation.
    lo = {m: torch.zeros(spec.num_layers) for m in spec.module_names}
    hi = {m: torch.full((spec.num_layers,), float("inf")) for m in spec.module_names}
    config = CheckpointConfig(generator=GeneratorConfig(method="icm", latent=latent, hidden=hidden), cvae=model.config,
                              spec=spec.to_dict(), basis_sha256="", embedding_model="", embedding_dim=condition_dim)
    # decode() never touches the registry, so none is needed.
    return LearnedGenerator(cast(Registry, None), model, Safety(lo, hi, -1.0), config, device=device, dtype=dtype)


def fused_decode(gen: LearnedGenerator, text: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exactly the decoding step of `LearnedGenerator.generate` (ICM: no μ*, σ*)."""
    return gen.decode(text, None, None, noise)


@torch.no_grad()
def naive_decode(gen: LearnedGenerator, text: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """How Text-to-LoRA generates: one request at a time, Python loops over layers and modules, one
    token per forward pass, same weights and same (one-sample) noise as the fused path."""
    model, dec, dt, dev = gen.model, gen.model.decoder, gen.dtype, gen.device
    spec, layout = model.layout.spec, model.layout
    mean = [m.to(dev) for m in gen.stats[0]]
    std = [s.to(dev) for s in gen.stats[1]]
    where = {}  # module -> (group index, slot inside the group's layer-major token run)
    for gi, g in enumerate(layout.groups):
        for j, m in enumerate(g.modules):
            where[m] = (gi, j, len(g.modules))
    n = text.shape[0]
    out = {m.name: torch.empty(n, spec.num_layers, m.out_features, spec.rank, device=dev, dtype=dt)
           for m in spec.modules}
    eps = noise[:1].to(dev, dt)
    for i in range(n):
        cond = model.condition(text[i : i + 1].to(dev, dt))
        mu_p, lv_p = model.prior(cond)
        zc = torch.cat([mu_p + (0.5 * lv_p).exp() * eps, cond], dim=-1)
        for layer in range(spec.num_layers):
            for t, module in enumerate(spec.modules):
                gi, j, per_layer = where[module.name]
                pos = torch.cat([dec.layer_emb.weight[layer], dec.type_emb.weight[t]])
                h = dec.trunk(dec.request_in(zc) + dec.position_in(pos))
                k = layer * per_layer + j
                token = dec.heads[gi](h).float() * std[gi][k] + mean[gi][k]
                out[module.name][i, layer] = token.view(module.out_features, spec.rank).to(dt)
    return out


# ------------------------------------------------------------------------ counting

def decode_flops(gen: LearnedGenerator, n: int) -> float:
    """Multiply-adds × 2 of the GEMMs in one fused decode of n requests (elementwise work ignored)."""
    model, c = gen.model, gen.model.config
    layout = model.layout
    T = layout.num_tokens
    per_request = model.condition[0].in_features * c.condition_hidden + (c.latent + c.condition_hidden) * c.hidden
    trunk = sum(m.in_features * m.out_features for m in model.decoder.trunk if isinstance(m, torch.nn.Linear))
    heads = sum(len(g.tokens) * c.hidden * g.width for g in layout.groups)
    positions = T * 2 * c.embed * c.hidden  # computed once per batch
    return 2.0 * (n * (per_request + T * trunk + heads) + positions)


def decode_bytes(gen: LearnedGenerator, n: int) -> dict[str, float]:
    """Estimated memory traffic of one fused ICM decode: every weight read once, the trunk
    activations (written and read a few times), the heads' augmented inputs, and the LoRA Bs, which
    the head GEMMs write once in the output dtype. `output` is that last term alone, the floor."""
    e = torch.finfo(gen.dtype).bits // 8
    c, layout = gen.model.config, gen.model.layout
    weights = sum(p.numel() for p in gen.model.decoder.parameters()) * e
    elements = n * sum(len(g.tokens) * g.width for g in layout.groups)
    activations = n * layout.num_tokens * c.hidden * e * 6
    return {"estimate": float(weights + activations + elements * e), "output": float(elements * e)}


# ------------------------------------------------------------------------ timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times


@dataclass
class Clock:
    """Wall vs this process's CPU time: on a machine shared with other work, a CPU-bound phase
    whose CPU time is well below threads × wall was waiting for cores."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)

    def utilisation(self) -> float:
        wall = time.perf_counter() - self.wall
        return round((time.process_time() - self.cpu) / max(wall, 1e-9), 2)


def device_ceilings(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Measured, not datasheet: a large matmul in `dtype` and a device-to-device copy."""
    if device != "cuda":
        return {}
    size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm = statistics.median(time_ms(lambda: a @ b, repeats=10, warmup=3, device=device))
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp = statistics.median(time_ms(lambda: dst.copy_(src), repeats=10, warmup=3, device=device))
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_flop_per_s": 2 * size**3 / (mm / 1000), "copy_bytes_per_s": 2 * (1 << 30) / (cp / 1000),
            "matmul_shape": size}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def descriptions(n: int) -> list[str]:
    """n distinct, plausible task descriptions."""
    verbs = ["reverse", "sort", "uppercase", "count", "translate", "summarise", "classify", "repeat"]
    things = ["the letters", "every word", "the sentence", "each number", "the vowels", "the tweet"]
    return [f"{verbs[i % len(verbs)]} {things[(i // len(verbs)) % len(things)]} of the input, variant {i}"
            for i in range(n)]


# ------------------------------------------------------------------------ the benchmark

def _summary(times: list[float], n: int) -> dict[str, Any]:
    ms = statistics.median(times)
    return {"ms_per_batch": round(ms, 4), "loras_per_s": round(n / (ms / 1000), 2),
            "ms_all": [round(t, 4) for t in times]}


def run_benchmark(spec: LoraSpec, cfg: BenchConfig, *, model_config: str = "",
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    check_config(cfg)
    say = log or (lambda _: None)
    dev, dt = cfg.device, cfg.torch_dtype()
    load_before = os.getloadavg()
    gen = build_generator(spec, hidden=cfg.hidden, latent=cfg.latent, device=dev, dtype=dt, seed=cfg.seed)
    noise = torch.randn(1, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    ceilings = device_ceilings(dev, dt)
    encoder = index = None
    if cfg.end_to_end:
        import faiss

        from ..embeddings import TextEncoder

        encoder = TextEncoder(cfg.encoder, device=dev)
        index = faiss.IndexFlatIP(encoder.dim)
        index.add(normalised(rng.standard_normal((cfg.registry_size, encoder.dim))))
    compiled = _compile(gen, noise, dev) if cfg.compile else None
    results = []
    for n in cfg.batches:
        text = torch.from_numpy(normalised(rng.standard_normal((n, CONDITION_DIM))))
        row: dict[str, Any] = {"batch": n}
        clock = Clock()
        with torch.no_grad():
            fused_times = time_ms(lambda: fused_decode(gen, text, noise), repeats=cfg.repeats,
                                  warmup=cfg.warmup, device=dev)
        row["fused"] = _summary(fused_times, n) | {"cpu_utilisation": clock.utilisation()}
        if compiled is not None:
            try:
                row["compiled"] = _time_compiled(compiled, gen, text, noise, row["fused"]["ms_per_batch"], cfg)
            except Exception as exc:  # a compiler failure is a result to report, not a reason to lose the run
                row["compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        flops, traffic = decode_flops(gen, n), decode_bytes(gen, n)
        sec = row["fused"]["ms_per_batch"] / 1000
        row["fused"] |= {"flop": flops, "flop_per_s": flops / sec, "bytes_estimate": traffic["estimate"],
                         "bytes_per_s_estimate": traffic["estimate"] / sec, "output_bytes": traffic["output"]}
        if ceilings:
            row["fused"] |= {"fraction_of_matmul_ceiling": flops / sec / ceilings["matmul_flop_per_s"],
                             "fraction_of_copy_ceiling": traffic["estimate"] / sec / ceilings["copy_bytes_per_s"]}

        m = min(n, cfg.naive_max)
        clock = Clock()
        naive_times = time_ms(lambda: naive_decode(gen, text[:m], noise), repeats=cfg.repeats,
                              warmup=cfg.warmup, device=dev)
        per_lora = statistics.median(naive_times) / m
        row["naive"] = {"requests_timed": m, "extrapolated": m < n, "ms_per_lora": round(per_lora, 4),
                        "ms_per_batch": round(per_lora * n, 4), "loras_per_s": round(1000 / per_lora, 2),
                        "ms_all_timed": [round(t, 4) for t in naive_times], "cpu_utilisation": clock.utilisation()}
        row["speedup"] = round(per_lora * n / row["fused"]["ms_per_batch"], 2)
        with torch.no_grad():
            fused = fused_decode(gen, text[:m], noise)
        naive = naive_decode(gen, text[:m], noise)
        row["agreement"] = {"requests": m, "max_abs_diff": max(
            float((fused[k].float() - naive[k].float()).abs().max()) for k in fused),
            "max_abs_value": max(float(fused[k].float().abs().max()) for k in fused)}

        if encoder is not None and index is not None:
            row["end_to_end"] = _end_to_end(gen, encoder, index, descriptions(n), noise, cfg)
        results.append(row)
        e2e = f", end to end {row['end_to_end']['loras_per_s']:.1f} LoRAs/s" if "end_to_end" in row else ""
        say(f"batch {n}: fused {row['fused']['loras_per_s']:.1f} LoRAs/s, naive {row['naive']['loras_per_s']:.1f}"
            f" LoRAs/s, ×{row['speedup']:.1f}{e2e}")

    return {
        "benchmark": "decode",
        "model_config": model_config,
        "spec": {"base_model": spec.base_model, "num_layers": spec.num_layers, "rank": spec.rank,
                 "modules": [asdict(m) for m in spec.modules], "tokens_per_lora": gen.model.layout.num_tokens,
                 "params_per_lora": sum(spec.num_layers * m.out_features * spec.rank for m in spec.modules)},
        "generator": {"method": "icm", "latent": cfg.latent, "hidden": cfg.hidden,
                      "decoder_params": sum(p.numel() for p in gen.model.decoder.parameters()),
                      "weights": "random", "condition_dim": CONDITION_DIM},
        "device": {"type": dev, "name": device_name(dev), "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "dtype": str(dt).removeprefix("torch."),
        "repeats": cfg.repeats, "warmup": cfg.warmup, "naive_max_requests": cfg.naive_max,
        "registry_size": cfg.registry_size if cfg.end_to_end else None,
        "ceilings": ceilings,
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
        "notes": [
            "ms_per_batch is the median over `repeats` timed runs after `warmup` untimed ones.",
            "naive: timed on min(batch, naive_max_requests) requests and extrapolated linearly per LoRA "
            "(it decodes one request at a time, so its per-LoRA cost does not depend on the batch).",
            "speedup = naive ms_per_batch (extrapolated) / fused ms_per_batch.",
            "fused timing = LearnedGenerator.decode (ICM-LoRA), the code generate() runs; flop counts the GEMMs; "
            "bytes_estimate models the weights, activations and one write of the output (the heads' GEMMs "
            "undo the normalisation and write the adapter dtype directly).",
            "end_to_end = text encoding (MiniLM) + FAISS IndexFlatIP top-k over random unit vectors + softmax "
            "weights + fused decode + safety checks (finite, norm clip); excludes building Lora objects / files.",
            "compiled (with --compile) = the same decode under torch.compile, mode reduce-overhead "
            "(CUDA graphs) on cuda and default on cpu; compilation and graph capture are in the untimed warm-up.",
            "cpu_utilisation = process CPU time / wall time over a phase; well below torch_threads on a "
            "CPU-bound phase means other processes took the cores.",
        ],
    }


def _compile(gen: LearnedGenerator, noise: torch.Tensor, device: str) -> Callable[[torch.Tensor], Any]:
    """The fused decode under torch.compile: inductor kernels, and on CUDA replayed as CUDA graphs
    (mode "reduce-overhead"), one graph per batch size."""
    mode = "reduce-overhead" if device == "cuda" else "default"
    return torch.compile(lambda text: fused_decode(gen, text, noise), mode=mode, dynamic=False)


def _time_compiled(compiled: Callable[[torch.Tensor], Any], gen: LearnedGenerator, text: torch.Tensor,
                   noise: torch.Tensor, eager_ms: float, cfg: BenchConfig) -> dict[str, Any]:
    with torch.no_grad():
        # The first calls compile and (on CUDA) record the graph; they are not timed.
        times = time_ms(lambda: compiled(text), repeats=cfg.repeats, warmup=max(cfg.warmup, 3), device=cfg.device)
        out, ref = compiled(text), fused_decode(gen, text, noise)
        diff = max(float((out[k].float() - ref[k].float()).abs().max()) for k in ref)
    summary = _summary(times, len(text))
    return summary | {"mode": "reduce-overhead" if cfg.device == "cuda" else "default",
                      "speedup_over_eager": round(eager_ms / summary["ms_per_batch"], 3), "max_abs_diff_vs_eager": diff}


def _end_to_end(gen: LearnedGenerator, encoder: Any, index: Any, texts: list[str], noise: torch.Tensor,
                cfg: BenchConfig) -> dict[str, Any]:
    stages: dict[str, list[float]] = {"encode": [], "retrieve": [], "decode": []}

    def once(record: bool) -> None:
        marks = [time.perf_counter()]
        vecs = normalised(encoder.encode(texts))
        marks.append(time.perf_counter())
        sims, _ = index.search(vecs, cfg.top_k)
        torch.softmax(torch.from_numpy(sims) / gen.model.config.temperature, dim=1)
        marks.append(time.perf_counter())
        with torch.no_grad():
            B = fused_decode(gen, torch.from_numpy(vecs), noise)
            norms = gen.safety.norms(B)
            gen.safety.check_finite(B, texts, norms)
            gen.safety.clip(B, norms)
        _sync(cfg.device)
        marks.append(time.perf_counter())
        if record:
            for key, a, b in zip(stages, marks, marks[1:]):
                stages[key].append(1000 * (b - a))

    for _ in range(cfg.warmup):
        once(False)
    total = []
    for _ in range(cfg.repeats):
        once(True)
        total.append(sum(s[-1] for s in stages.values()))
    return _summary(total, len(texts)) | {f"{k}_ms": round(statistics.median(v), 4) for k, v in stages.items()}
