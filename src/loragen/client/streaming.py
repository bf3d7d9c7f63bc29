"""Server-sent events of a streamed completion, read as typed chunks (sync and async).

Each event is `data: <json>`; `data: [DONE]` ends the stream. An event holding `{"error": ...}`
(the server failed after the answer began) raises `LoragenAPIError`. Leaving the loop early closes
the connection, which stops the server's generation of that request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from .types import LoragenAPIError

C = TypeVar("C", bound=BaseModel)
DONE = "[DONE]"


def _parse(line: str, kind: type[C]) -> C | None | bool:
    """The chunk of one line; None for lines that carry none; False at the end."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == DONE:
        return False
    body: dict[str, Any] = json.loads(data)
    if "error" in body:
        err = body["error"]
        raise LoragenAPIError(200, str(err.get("code", "error")), str(err.get("message", "")))
    return kind.model_validate(body)


def iter_chunks(response: httpx.Response, kind: type[C]) -> Iterator[C]:
    try:
        for line in response.iter_lines():
            chunk = _parse(line, kind)
            if chunk is False:
                return
            if isinstance(chunk, BaseModel):
                yield chunk
    finally:
        response.close()


async def aiter_chunks(response: httpx.Response, kind: type[C]) -> AsyncIterator[C]:
    try:
        async for line in response.aiter_lines():
            chunk = _parse(line, kind)
            if chunk is False:
                return
            if isinstance(chunk, BaseModel):
                yield chunk
    finally:
        await response.aclose()
