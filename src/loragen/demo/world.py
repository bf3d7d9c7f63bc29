"""The demo world (DESIGN §6), built offline by loragen itself and cached under `$LORAGEN_HOME/demo`.

1. A character tokenizer and a small Llama made from a transformers config, pre-trained on copying.
2. The string-transformation tasks of `tasks`, written as a task file.
3. A registry over the base model, one expert per task, registered with every description but the
   unseen paraphrase. The experts learn the registry's shared basis as they train (from every task
   but the held-out ones), which then stays frozen.
4. The registry's multi-task LoRA, and the icm and sg generators.
It is built in two stages, each written whole: 1-3 (all the retrieval methods need, so a server can
answer while the rest trains), then 4. `BUILD.json`, written last, marks the world built.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import Basis, atomic, spec_from_config
from ..basemodel import BaseModel
from ..embeddings import TextEncoder
from ..errors import LoragenError
from ..generator import train_generator
from ..generator.description_encoder import DescriptionEncoder
from ..generator.description_head import DescriptionHead
from ..generator.task_vector import TaskVectors
from ..registry import Registry
from ..registry.multitask import save_multitask
from ..training.causal import train_causal_experts
from ..training.experts import ExpertConfig, ExpertRun
from ..training.multitask import MultitaskConfig, train_multitask
from ..training.objective import TaskModel
from ..training.parallel import Group, Team
from ..training.tasks import Task, read_tasks, write_tasks
from .tasks import demo_tasks, random_word

DEMO_VERSION = 20  # raised whenever the built world changes, so a cached world of another version is rebuilt
SEPARATOR = "="
VOCAB_CHARS = string.ascii_lowercase + string.digits + " =*>"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
# τ = 0.01 keeps SG's prior on the nearest expert when descriptions differ by one word (the
# Caesar family), which a warmer softmax mixes; icm's memory read likewise reads the dev
# paraphrases better at 0.01 than at 0.05.
# lr 5e-3 lets icm reproduce every registry expert within the epochs the build has time for;
# sg stops early by itself.
GENERATOR_OPTIONS: dict[str, dict[str, float]] = {"icm": {"lr": 5e-3, "temperature": 0.01}, "sg": {"temperature": 0.01}}
# Tasks whose experts the held-out generators never see (evaluation's zero-shot question).
HELD_OUT = ("caesar_2", "rotate_right", "drop_last")
ALPHA = 32.0


@dataclass
class DemoConfig:
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    intermediate: int = 288
    pretrain_steps: int = 150
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    instances_per_task: int = 2000
    experts: ExpertConfig = None  # type: ignore[assignment]
    # the registry's multi-task LoRA (method `multitask`), on every demo task's training split
    multitask: MultitaskConfig = field(default_factory=lambda: MultitaskConfig(steps=150, rows_per_task=2,
                                                                               train_fraction=0.9))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experts is None:
            self.experts = ExpertConfig(
                steps=200, lr=1e-2, rows_per_task=16, checkpoints=5, checkpoint_every=10, train_fraction=0.9,
                oversample={"reverse": 1, "swap_pairs": 1, "sort": 1}, length_passes=4,
                basis_lr=1e-2, basis_frozen_for=HELD_OUT, workers=2,
            )


@dataclass
class DemoWorld:
    root: Path

    @property
    def base_model(self) -> Path:
        return self.root / "base"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def generators(self) -> Path:
        return self.root / "generators"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "BUILD.json"

    @property
    def experts_manifest(self) -> Path:
        return self.root / "EXPERTS.json"

    @property
    def rng_state(self) -> Path:
        return self.root / "rng_state.pt"

    def is_built(self) -> bool:
        """Every stage is in place (`BUILD.json`, written last, is of this version)."""
        return _version(self.manifest) == DEMO_VERSION

    def has_experts(self) -> bool:
        """The first stage is in place: base model, tasks and the registry's experts."""
        return _version(self.experts_manifest) == DEMO_VERSION or self.is_built()


def _version(manifest: Path) -> int | None:
    try:
        return json.loads(manifest.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def build_tokenizer(directory: Path | None):  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer that `AutoTokenizer` loads, with the demo chat template
    (saved in `directory` if given)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(VOCAB_CHARS))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
    )
    # The prompt of an input is <bos>, the input, then the separator. The <bos> gives attention a
    # sink to rest on, which the experts' LoRAs need (without it several tasks learn far worse).
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}" + SEPARATOR + "{% endif %}"
    )
    if directory is not None:
        tok.save_pretrained(directory)
    return tok


def build_base_model(directory: Path | None, config: DemoConfig, group: Group | None = None) -> BaseModel:
    """Create the Llama from a config, pre-train it on copying, save it in HF format in `directory`
    (if given). `group`: pre-train as one of data-parallel processes (`training.parallel`), each
    running its share of every batch's rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(directory)
    torch.manual_seed(config.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.heads, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    base = BaseModel(LlamaForCausalLM(cfg), tok, str(directory or ""))
    model = base.model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.0,
                              fused=True)
    warmup, steps = 50, config.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(config.seed)
    mine = group.share(config.pretrain_batch) if group else list(range(config.pretrain_batch))
    for _ in tqdm(range(steps), desc="pre-train base (copy)", unit="step", disable=bool(group and group.rank)):
        words = [random_word(rng) for _ in range(config.pretrain_batch)]
        rows = [words[i] for i in mine]
        enc = base.encode_pairs(rows, rows)
        loss = model(**enc).loss * (len(mine) / len(words))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if group:
            group.sum_grads(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
    model.eval()
    if directory is not None:
        model.save_pretrained(directory)
    return base


def build_demo(home: Path, *, config: DemoConfig | None = None, force: bool = False,
               encoder: TextEncoder | None = None) -> DemoWorld:
    """Build the demo world under `home/demo` unless it is already built (idempotent): its experts
    (`build_demo_experts`), then the rest (`finish_demo`)."""
    world = build_demo_experts(home, config=config, force=force, encoder=encoder)
    return finish_demo(world, config=config, encoder=encoder)


def build_demo_experts(home: Path, *, config: DemoConfig | None = None, force: bool = False,
                       encoder: TextEncoder | None = None) -> DemoWorld:
    """The world's first stage: the base model, the task file and the registry of experts, which
    is all the retrieval methods need. Built in a temp directory and renamed into place, so the
    world is absent or holds its experts; `finish_demo` adds the rest."""
    config = config or DemoConfig()
    world = DemoWorld(Path(home) / "demo")
    if world.has_experts() and not force:
        return world
    started = time.perf_counter()
    with atomic.directory(world.root) as tmp:
        staged = DemoWorld(tmp)
        tasks = demo_tasks(instances_per_task=config.instances_per_task, seed=config.seed)
        write_tasks(staged.tasks, tasks)
        # Paths inside the world are written as their final location, not the temp one.
        with Team(config.experts.workers, _train_first_stage, staged.base_model, str(world.base_model), config,
                  tasks) as team:
            encoder = encoder or TextEncoder()
            encoder.dim  # noqa: B018  (loads the text encoder while the other processes start)
            runs = team.run()
        basis = runs[0].basis  # every run's; its spec is the base model's, named by its final path
        registry = Registry.create(staged.registry, basis.spec, encoder=encoder, basis=basis)
        for run in runs:
            registry.add_expert(
                run.task.name, run.checkpoints, run.task.descriptions[:-1],
                metrics=run.metrics, tags=["demo"],
            )
        registry.close()
        # The second stage starts from the random state the first one leaves, in this process or another.
        torch.save(torch.get_rng_state(), staged.rng_state)
        summary = {"version": DEMO_VERSION, "seconds": round(time.perf_counter() - started, 1),
                   "experts": {r.task.name: r.metrics for r in runs}}
        staged.experts_manifest.write_text(json.dumps(summary, indent=2))
    return world


def _train_first_stage(group: Group | None, directory: Path, base_name: str, config: DemoConfig,
                       tasks: list[Task]) -> list[ExpertRun]:
    """Pre-train the base (process 0 saves it in `directory`) and train the experts in its basis."""
    base = build_base_model(directory if group is None or group.rank == 0 else None, config, group)
    spec = spec_from_config(base.model.config.to_dict(), targets=TARGETS, rank=RANK, alpha=ALPHA,
                            base_model=base_name)
    return train_causal_experts(base, Basis.seeded(spec, config.seed), tasks, config.experts, group=group)


def finish_demo(world: DemoWorld, *, config: DemoConfig | None = None,
                encoder: TextEncoder | None = None) -> DemoWorld:
    """The world's second stage, over its experts: the registry's multi-task LoRA, then the icm and
    sg generators. The multi-task LoRA is written whole; the generators directory is renamed into
    place; `BUILD.json`, which marks the world built, is written last."""
    config = config or DemoConfig()
    if world.is_built():
        return world
    if not world.has_experts():
        raise LoragenError(f"the demo world at {world.root} has no experts yet; build it with `loragen demo build`")
    started = time.perf_counter()
    experts = json.loads(world.experts_manifest.read_text())
    base = BaseModel.load(world.base_model)
    tasks = read_tasks(world.tasks)
    registry = Registry.open(world.registry, encoder=encoder or TextEncoder())
    spec = registry.spec
    torch.set_rng_state(torch.load(world.rng_state))
    try:
        with torch.random.fork_rng():  # the generators below see the random state they always saw
            save_multitask(registry, train_multitask(registry, tasks, TaskModel("causal", base), config.multitask))
        experts_done = time.perf_counter()
        with atomic.directory(world.generators) as generators:
            # icm and sg read descriptions through one tuned encoder and head
            tuned: bool | DescriptionEncoder = True
            head: bool | DescriptionHead = True
            for method in ("icm", "sg"):
                gen = train_generator(registry, method, out_dir=generators / method, seed=config.seed,
                                      examples=demo_examples(tasks, config) if method == "icm" else None,
                                      task_vectors=TaskVectors(spec, loaded=base), description_encoder=tuned,
                                      description_head=head, progress=True, **GENERATOR_OPTIONS[method])
                tuned, head = gen.encoder or False, gen.head or False
    finally:
        registry.close()
    summary = {
        "version": DEMO_VERSION,
        "seconds": round(experts["seconds"] + time.perf_counter() - started, 1),
        "generator_seconds": round(time.perf_counter() - experts_done, 1),
        "experts": experts["experts"],
    }
    atomic.write_bytes(world.manifest, json.dumps(summary, indent=2).encode())
    return world


def demo_examples(tasks: list[Task], config: DemoConfig) -> dict[str, list[dict[str, str]]]:
    """Input/output pairs from each task's training split, for ICM-LoRA's task vectors."""
    return {t.name: t.example_pairs(config.experts.train_fraction, config.seed, 64) for t in tasks}


def ensure_holdout_generators(world: DemoWorld, seed: int = 0) -> None:
    """Train (once) the generators that never see the HELD_OUT tasks' experts."""
    missing = [m for m in ("icm", "sg") if not (world.generators / f"{m}-holdout" / "config.json").is_file()]
    if not missing:
        return
    registry = Registry.open(world.registry)
    examples = demo_examples(read_tasks(world.tasks), DemoConfig(seed=seed))
    # one tuned encoder and head, learned without the held-out tasks' descriptions
    encoder: bool | DescriptionEncoder = True
    head: bool | DescriptionHead = True
    for method in missing:
        gen = train_generator(registry, method, out_dir=world.generators / f"{method}-holdout",
                              holdout=HELD_OUT, seed=seed, examples=examples if method == "icm" else None,
                              description_encoder=encoder, description_head=head, progress=True,
                              **GENERATOR_OPTIONS[method])
        encoder, head = gen.encoder or False, gen.head or False
