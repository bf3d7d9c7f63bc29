"""`client.experts`: list, get, add (upload a PEFT adapter directory) and delete registry experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .adapter import adapter_upload
from .types import Call, Expert, ExpertPage, ImportedExpert


class Sends(Protocol):
    """What `Experts` needs of its client: one call sent, its JSON answer back (`Client._json`)."""

    def _json(self, call: Call) -> Any: ...


class SendsAsync(Protocol):
    """What `AsyncExperts` needs of its client (`AsyncClient._json`)."""

    async def _json(self, call: Call) -> Any: ...


class Experts:
    def __init__(self, client: Sends) -> None:
        self._c = client

    def list(self, offset: int = 0, limit: int = 50) -> ExpertPage:
        data = self._c._json(Call("GET", "/v1/experts", {"params": {"offset": offset, "limit": limit}}))
        return ExpertPage.model_validate(data)

    def get(self, key: int | str) -> Expert:
        return Expert.model_validate(self._c._json(Call("GET", f"/v1/experts/{key}")))

    def delete(self, key: int | str) -> dict[str, Any]:
        return dict(self._c._json(Call("DELETE", f"/v1/experts/{key}")))

    def add(self, directory: str | Path, name: str, descriptions: list[str],
            tags: tuple[str, ...] | list[str] = ()) -> ImportedExpert:
        """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors); the
        answer lists the registry's modules the adapter does not target in `absent_modules`."""
        data = {"name": name, "description": list(descriptions), "tags": list(tags)}
        return ImportedExpert.model_validate(self._c._json(Call("POST", "/v1/experts",
                                                    {"data": data, "files": adapter_upload(directory)})))


class AsyncExperts:
    def __init__(self, client: SendsAsync) -> None:
        self._c = client

    async def list(self, offset: int = 0, limit: int = 50) -> ExpertPage:
        data = await self._c._json(Call("GET", "/v1/experts", {"params": {"offset": offset, "limit": limit}}))
        return ExpertPage.model_validate(data)

    async def get(self, key: int | str) -> Expert:
        return Expert.model_validate(await self._c._json(Call("GET", f"/v1/experts/{key}")))

    async def delete(self, key: int | str) -> dict[str, Any]:
        return dict(await self._c._json(Call("DELETE", f"/v1/experts/{key}")))

    async def add(self, directory: str | Path, name: str, descriptions: list[str],
                  tags: tuple[str, ...] | list[str] = ()) -> ImportedExpert:
        data = {"name": name, "description": list(descriptions), "tags": list(tags)}
        return ImportedExpert.model_validate(await self._c._json(Call("POST", "/v1/experts",
                                                          {"data": data, "files": adapter_upload(directory)})))
