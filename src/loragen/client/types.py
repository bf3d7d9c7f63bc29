"""What the SDK returns and raises, and the parsing shared by `Client` and `AsyncClient`."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from ..adapters import Lora
from ..adapters.lora import CONFIG_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "loragen.json")


class LoragenAPIError(Exception):
    """The server answered with an error: `status` (HTTP), `code` and `message` from its body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class BadRequestError(LoragenAPIError):
    """400, 413, 422: the request needs fixing."""


class AuthenticationError(LoragenAPIError):
    """401 (no or malformed key) or 403 (wrong key)."""


class NotFoundError(LoragenAPIError):
    """404: unknown LoRA or expert id."""


class ConflictError(LoragenAPIError):
    """409: e.g. an expert of that name exists."""


class ServerError(LoragenAPIError):
    """5xx."""


class LoragenConnectionError(LoragenAPIError):
    """The server could not be reached, after the retries."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "connection_error", message)


@dataclass
class Call:
    """One HTTP request: method, path, and httpx keyword arguments (json, params, data, files)."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    status = response.status_code
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    kind: type[LoragenAPIError] = LoragenAPIError
    if status in (400, 413, 422):
        kind = BadRequestError
    elif status in (401, 403):
        kind = AuthenticationError
    elif status == 404:
        kind = NotFoundError
    elif status == 409:
        kind = ConflictError
    elif status >= 500:
        kind = ServerError
    raise kind(status, code, message)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class Neighbour:
    expert: str
    expert_id: int
    similarity: float
    weight: float
    example_logprob: float | None = None


@dataclass
class SearchHit:
    expert: str
    expert_id: int
    description: str
    similarity: float


@dataclass
class GenerationResult:
    id: str
    method: str
    description: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    neighbours: list[Neighbour]
    ood: bool | None
    clipped: bool | None
    seed: int | None
    sample_ids: list[str]
    cached: bool
    timings: dict[str, float]
    lora: Lora | None = None  # downloaded unless `download=False`
    examples_used: bool | None = None
    examples_from_description: bool | None = None
    examples_fit: float | None = None
    examples_ood: bool | None = None
    ambiguous: bool | None = None  # no expert holds 90 % of the weight: the LoRA mixes tasks

    @classmethod
    def from_json(cls, data: dict[str, Any], lora: Lora | None = None) -> GenerationResult:
        d = _known(cls, data)
        d["neighbours"] = [Neighbour(**_known(Neighbour, n)) for n in data.get("neighbours", [])]
        return cls(**d, lora=lora)

    def _need_lora(self) -> Lora:
        if self.lora is None:
            raise ValueError(f"LoRA {self.id} was not downloaded; call client.download({self.id!r})")
        return self.lora

    def save_pretrained(self, directory: str | Path) -> Path:
        return self._need_lora().save_pretrained(directory)

    def merge_into(self, model: Any) -> Any:
        return self._need_lora().merge_into(model)


@dataclass
class Expert:
    id: int
    name: str
    base_model: str
    rank: int
    alpha: float
    targets: list[str] | str
    created: str
    descriptions: list[str]
    tags: list[str]
    metrics: dict[str, Any]
    fidelity: float | None
    absent_modules: list[str] | None = None  # on upload: modules the adapter does not target (zero ΔW)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Expert:
        return cls(**_known(cls, data))


@dataclass
class ExpertPage:
    data: list[Expert]
    total: int
    offset: int
    limit: int


@dataclass
class Completion:
    id: str
    text: str
    model: str
    lora_id: str | None
    finish_reason: str | None = None  # "stop" or "length"
    usage: dict[str, int] | None = None  # prompt_tokens, completion_tokens, total_tokens
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        choice = data["choices"][0]
        return cls(data["id"], choice["text"], data.get("model", ""), data.get("lora_id"),
                   choice.get("finish_reason"), data.get("usage"), data)


def load_zip(path: Path) -> Lora:
    """A `Lora` from a downloaded adapter zip; only the PEFT files are extracted, by fixed names."""
    target = path.parent / "adapter"
    target.mkdir()
    with zipfile.ZipFile(path) as zf:
        for name in ADAPTER_FILES:
            if name in zf.namelist():
                (target / name).write_bytes(zf.read(name))
    return Lora.from_pretrained(target)


def adapter_upload(directory: str | Path) -> dict[str, tuple[str, bytes, str]]:
    directory = Path(directory)
    return {"adapter_config": (CONFIG_NAME, (directory / CONFIG_NAME).read_bytes(), "application/json"),
            "adapter_model": (WEIGHTS_NAME, (directory / WEIGHTS_NAME).read_bytes(), "application/octet-stream")}
