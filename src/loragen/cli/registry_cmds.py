"""`loragen registry ...`: create a registry, import adapters, search, rebase."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings
from ..errors import LoragenError

app = typer.Typer(no_args_is_help=True, add_completion=False)

RegistryOpt = Annotated[Path | None, typer.Option("--registry", help="Registry directory [default: from settings].")]
LOW_FIDELITY = 0.9


def _dir(registry: Path | None) -> Path:
    return registry if registry is not None else Settings().registry_dir


def _open(registry: Path | None):  # type: ignore[no-untyped-def]
    from ..registry import Registry

    return Registry.open(_dir(registry))


def _report(name: str, fidelity: float | None, rank: int, absent: tuple[str, ...] = ()) -> None:
    """One line per imported adapter: its fidelity and the registry's modules it does not target."""
    if fidelity is None:
        print(f"added {name}")
        return
    note = f"; absent modules (zero ΔW): {', '.join(absent)}" if absent else ""
    print(f"added {name}: fidelity {fidelity:.3f}{note}")
    if fidelity < LOW_FIDELITY:
        print(
            f"warning: {name} keeps only {fidelity:.0%} of its ΔW in the registry basis; "
            f"consider `loragen registry rebase --rank {max(2 * rank, 32)}`",
            file=sys.stderr,
        )


@app.command()
def init(
    directory: Annotated[Path | None, typer.Argument(help="Registry directory [default: --registry].")] = None,
    base: Annotated[Path, typer.Option("--base", help="Base model directory or its config.json.")] = ...,  # type: ignore[assignment]
    targets: Annotated[str | None, typer.Option(help="Comma-separated target modules.")] = None,
    rank: int = 8,
    alpha: float | None = None,
    encoder: Annotated[str | None, typer.Option(help="Sentence-transformers model [default: settings].")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Create an empty registry for a base model."""
    from ..adapters import spec_from_config
    from ..embeddings.text import TextEncoder
    from ..registry import Registry, RegistryError

    path = directory or _dir(registry)
    if not base.exists():
        raise RegistryError(f"no base model config at {base}")
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    spec = spec_from_config(base, targets=names, rank=rank, alpha=alpha, base_model=str(base.resolve()))
    reg = Registry.create(path, spec, encoder=TextEncoder(encoder or Settings().encoder))
    print(f"created registry at {reg.path}: {spec.num_layers} layers, modules {', '.join(spec.module_names)}, rank {spec.rank}")


@app.command()
def add(
    adapter_dir: Path,
    description: Annotated[list[str], typer.Option("--description", "-d", help="Task description (repeatable).")],
    name: Annotated[str | None, typer.Option(help="Expert name [default: the directory name].")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag (repeatable).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Import one PEFT adapter directory as an expert."""
    from ..adapters import Lora

    reg = _open(registry)
    lora = Lora.from_pretrained(adapter_dir)
    expert, proj = reg.import_adapter(lora, name or adapter_dir.resolve().name, description, tags=tag)
    _report(expert.name, proj.fidelity, reg.spec.rank, proj.absent_modules)


def _manifest(directory: Path) -> list[tuple[Path, str, list[str], list[str]]]:
    """(adapter dir, name, descriptions, tags) from manifest.jsonl or sub-directories."""
    from ..registry import RegistryError

    items = []
    manifest = directory / "manifest.jsonl"
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                path = directory / entry["path"]
                descs = entry.get("descriptions", entry.get("description"))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RegistryError(f"{manifest}:{n}: not a valid entry ({exc})") from exc
            descs = [descs] if isinstance(descs, str) else list(descs or [])
            items.append((path, str(entry.get("name") or path.name), descs, list(entry.get("tags") or [])))
        return items
    if not directory.is_dir():
        raise RegistryError(f"no directory {directory}")
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        desc_file = sub / "description.txt"
        if not desc_file.is_file():
            raise RegistryError(f"{sub} has no description.txt (one description per line)")
        descs = [ln.strip() for ln in desc_file.read_text().splitlines() if ln.strip()]
        items.append((sub, sub.name, descs, []))
    return items


@app.command("import")
def import_(directory: Path, registry: RegistryOpt = None) -> None:
    """Import every adapter of DIR (sub-directories with description.txt, or manifest.jsonl)."""
    from ..adapters import Lora
    from ..registry import RegistryError

    reg = _open(registry)
    items = _manifest(directory)
    for path, name, descs, tags in items:
        try:
            expert, proj = reg.import_adapter(Lora.from_pretrained(path), name, descs, tags=tags)
        except LoragenError as exc:
            raise RegistryError(f"import stopped at {name} ({path}): {exc}") from exc
        _report(expert.name, proj.fidelity, reg.spec.rank, proj.absent_modules)
        sys.stdout.flush()
    print(f"imported {len(items)} adapters")


@app.command("list")
def list_(registry: RegistryOpt = None) -> None:
    """List the experts."""
    reg = _open(registry)
    experts = reg.experts()
    for e in experts:
        fid = "-" if e.fidelity is None else f"{e.fidelity:.3f}"
        print(f"{e.id}\t{e.name}\tfidelity {fid}\t{len(e.checkpoints)} ckpt\t{e.descriptions[0]}")
    print(f"{len(experts)} experts")


@app.command()
def show(key: str, registry: RegistryOpt = None) -> None:
    """Show one expert by id or name."""
    e = _open(registry).get(key)
    print(f"id: {e.id}\nname: {e.name}\nbase_model: {e.base_model}\nrank: {e.rank}\nalpha: {e.alpha}")
    print(f"targets: {e.targets}\nfidelity: {e.fidelity}\ncreated: {e.created}\nsha256: {e.sha256}")
    print(f"source_sha256: {e.source_sha256}\ncheckpoints: {len(e.checkpoints)}\ntags: {', '.join(e.tags)}")
    print(f"metrics: {json.dumps(e.metrics)}\ndescriptions:")
    for d in e.descriptions:
        print(f"  - {d}")


@app.command()
def rm(key: str, registry: RegistryOpt = None) -> None:
    """Remove an expert by id or name."""
    reg = _open(registry)
    e = reg.get(key)
    reg.remove(e.id)
    print(f"removed {e.name}")


@app.command()
def search(text: str, k: Annotated[int, typer.Option("-k", help="Experts to return.")] = 5,
           registry: RegistryOpt = None) -> None:
    """Find the experts whose descriptions are closest to TEXT."""
    for i, hit in enumerate(_open(registry).search([text], k)[0], 1):
        print(f"{i}\t{hit.name}\t{hit.similarity:.3f}\t{hit.description}")


@app.command()
def reindex(encoder: Annotated[str | None, typer.Option(help="Switch to this encoder.")] = None,
            registry: RegistryOpt = None) -> None:
    """Re-embed every description (optionally with a new encoder) and rebuild the index."""
    from ..embeddings.text import TextEncoder
    from ..registry import Registry

    enc = TextEncoder(encoder) if encoder else None
    reg = Registry.open(_dir(registry), encoder=enc, allow_encoder_change=True)
    print(f"reindexed {reg.reindex()} descriptions with {reg.encoder.model_id}")


@app.command()
def rebase(rank: Annotated[int, typer.Option("--rank", help="New basis rank.")], registry: RegistryOpt = None) -> None:
    """Replace the basis by the top directions of all experts' ΔW and re-project every expert."""
    reg = _open(registry)
    for e, fidelity in reg.rebase(rank):
        print(f"{e.name}: fidelity {fidelity:.3f}")
    print(f"rebased to rank {rank}")
