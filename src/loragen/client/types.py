"""What the SDK returns and raises, and the parsing shared by `Client` and `AsyncClient`.

The answers' shapes are `loragen.schemas`, the models the service itself answers with; the SDK
names them for what they are to a caller (`Neighbour`, `SearchHit`, `Expert`, `ExpertPage`).
Torch-free.
"""

from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import PrivateAttr

from ..schemas import (ChatCompletionChunk, ChatCompletionOut, CompletionChunk,  # noqa: F401 (chunks: re-exported)
                       ExpertList, ExpertOut, HitOut, ImportedExpertOut, LoraOut, NeighbourOut)
from .adapter import AdapterFiles, adapter_upload  # noqa: F401 (adapter_upload: re-exported)

if TYPE_CHECKING:
    from ..adapters import Lora

Neighbour = NeighbourOut  # an expert a LoRA was mixed from, with its weight
SearchHit = HitOut  # an expert found by description
Expert = ExpertOut  # a registry expert
ImportedExpert = ImportedExpertOut  # an uploaded expert, with the modules its adapter does not target
ExpertPage = ExpertList  # a page of `client.experts.list`
ChatCompletion = ChatCompletionOut  # `client.chat`'s answer: choices[i].message.content, finish_reason, usage


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


class RateLimitError(LoragenAPIError):
    """429: too many requests for this key, or the server's queue is full; tried again first."""


class ServerError(LoragenAPIError):
    """5xx (a 503 is tried again first)."""


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
    elif status == 429:
        kind = RateLimitError
    elif status >= 500:
        kind = ServerError
    raise kind(status, code, message)


class GenerationResult(LoraOut):
    """A generated LoRA's description (`LoraOut`), and its files when downloaded.

    `adapter` holds the PEFT files (torch-free); `lora` is loragen's `Lora` of them, built on
    first use (needs torch). Both are None when generated with `download=False`."""

    _adapter: AdapterFiles | None = PrivateAttr(default=None)
    _lora: Any = PrivateAttr(default=None)

    @classmethod
    def from_json(cls, data: dict[str, Any], adapter: AdapterFiles | None = None) -> GenerationResult:
        result = cls.model_validate(data)
        result._adapter = adapter
        return result

    @property
    def adapter(self) -> AdapterFiles | None:
        return self._adapter

    @property
    def lora(self) -> Lora | None:
        if self._adapter is not None and self._lora is None:
            self._lora = self._adapter.to_lora()
        return self._lora

    def _need_adapter(self) -> AdapterFiles:
        if self._adapter is None:
            raise ValueError(f"LoRA {self.id} was not downloaded; call client.download({self.id!r})")
        return self._adapter

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the PEFT adapter directory (see `AdapterFiles.save_pretrained`)."""
        return self._need_adapter().save_pretrained(directory)

    def merge_into(self, model: Any) -> Any:
        """Add ΔW to a transformers model's weights in place; needs torch."""
        lora = self.lora
        return (lora if lora is not None else self._need_adapter()).merge_into(model)


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


def retry_after(response: httpx.Response) -> float | None:
    """The response's `Retry-After` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
