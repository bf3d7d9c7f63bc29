"""`Client` and `AsyncClient` over httpx, in the LoRAX client's shape.

    client = Client("http://127.0.0.1:8000")
    result = client.generate("reverse the input string")
    result.save_pretrained("./adapter")
    answer = client.chat([{"role": "user", "content": "abcde"}], model=result.id)
    print(answer.choices[0].message.content)
    for chunk in client.chat([{"role": "user", "content": "abcde"}], model=result.id, stream=True):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="")

Connection failures (the request never reached the server) are retried by httpx's transport
(`retries`: the first retry at once, then with a doubling backoff from 0.5 s) and then raise
`LoragenConnectionError`. A 429 or 503 (the server is busy, rate-limited or still starting, and did
not run the request) is tried again up to `retries` times, after the server's `Retry-After` when it
sends one and otherwise after `backoff` seconds doubled each time, never waiting more than
`max_retry_wait` at once; then it raises `RateLimitError` or `ServerError`. Other errors raise typed
`LoragenAPIError`s at once. A downloaded adapter is
`AdapterFiles`, the PEFT files in memory (streamed through a temp file); nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal, overload

import httpx

from .adapter import AdapterFiles
from .experts import AsyncExperts, Experts
from .streaming import aiter_chunks, iter_chunks
from .types import (Call, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, GenerationResult,
                    LoragenConnectionError, SearchHit, raise_for, retry_after)

Messages = list[dict[str, Any]]  # OpenAI's chat messages: {"role", "content"}

# What the transport retries: the request never reached the server.
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
# What the client tries again: the server answered that it did not run the request, for now.
RETRIED_STATUSES = (429, 503)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class _Api:
    """Request building and the retry rule, shared by both clients.

    `retries` is how often a failed connection, or a 429/503 answer, is tried again; `backoff` is
    the first wait after a 429/503 without `Retry-After` (doubled each time), and `max_retry_wait`
    caps any one wait, `Retry-After` included."""

    def __init__(self, base_url: str, api_key: str | None, retries: int, backoff: float,
                 max_retry_wait: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries, self.backoff, self.max_retry_wait = retries, backoff, max_retry_wait

    def retry_wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending `response`'s request again (attempt 0 is the first retry),
        or None when it is not tried again."""
        if response.status_code not in RETRIED_STATUSES or attempt >= self.retries:
            return None
        wait = retry_after(response)
        return min(self.backoff * 2 ** attempt if wait is None else wait, self.max_retry_wait)

    def unreachable(self, exc: Exception) -> LoragenConnectionError:
        return LoragenConnectionError(f"cannot reach {self.base_url} after {self.retries} retries: {exc}")

    @staticmethod
    def search_body(description: str, k: int, method: str | None) -> dict[str, Any]:
        return _drop_none({"description": description, "k": k, "method": method})

    @staticmethod
    def generate_call(description: str, method: str, k: int | None, seed: int | None, num_samples: int,
                 examples: list[dict[str, str]] | None) -> Call:
        body = _drop_none({"description": description, "method": method, "k": k, "seed": seed,
                           "num_samples": num_samples, "examples": examples})
        return Call("POST", "/v1/loras", {"json": body})

    @staticmethod
    def batch_call(descriptions: list[str], method: str, k: int | None, seed: int | None) -> Call:
        body = _drop_none({"descriptions": list(descriptions), "method": method, "k": k, "seed": seed})
        return Call("POST", "/v1/loras/batch", {"json": body})

    @staticmethod
    def complete_call(prompt: str, description: str | None, lora_id: str | None, method: str, max_tokens: int,
                      temperature: float, seed: int | None, stop: str | list[str] | None, stream: bool = False) -> Call:
        body = _drop_none({"prompt": prompt, "description": description, "lora_id": lora_id, "method": method,
                           "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stop": stop})
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return Call("POST", "/v1/completions", {"json": body})

    @staticmethod
    def chat_call(messages: Messages, options: dict[str, Any], stream: bool, include_usage: bool) -> Call:
        body = _drop_none({"messages": list(messages), **options})
        if stream:
            body["stream"] = True
            if include_usage:
                body["stream_options"] = {"include_usage": True}
        return Call("POST", "/v1/chat/completions", {"json": body})


def chat_options(model: str | None, description: str | None, lora_id: str | None, method: str | None,
                 examples: list[dict[str, str]] | None, max_tokens: int, temperature: float, top_p: float | None,
                 n: int, seed: int | None, stop: str | list[str] | None) -> dict[str, Any]:
    return {"model": model, "description": description, "lora_id": lora_id, "method": method, "examples": examples,
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": n, "seed": seed, "stop": stop}


class Client(_Api):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, max_retry_wait: float = 30.0) -> None:
        super().__init__(base_url, api_key, retries, backoff, max_retry_wait)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                  transport=httpx.HTTPTransport(retries=retries))
        self.experts = Experts(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(call.method, call.path, **call.kwargs)
            try:
                response = self._http.send(request, stream=stream)
            except UNREACHABLE as exc:
                raise self.unreachable(exc) from exc
            if stream and not response.is_success:
                response.read()
            wait = self.retry_wait(response, attempt)
            if wait is None:
                break
            response.close()
            time.sleep(wait)
            attempt += 1
        raise_for(response)
        return response

    def _json(self, call: Call) -> Any:
        return self._send(call).json()

    def generate(self, description: str, *, method: str = "weighted", k: int | None = None, seed: int | None = None,
                 num_samples: int = 1, examples: list[dict[str, str]] | None = None,
                 download: bool = True) -> GenerationResult:
        data = self._json(_Api.generate_call(description, method, k, seed, num_samples, examples))
        return GenerationResult.from_json(data, self.download(data["id"]) if download else None)

    def generate_batch(self, descriptions: list[str], *, method: str = "weighted", k: int | None = None,
                       seed: int | None = None, download: bool = False) -> list[GenerationResult]:
        data = self._json(_Api.batch_call(descriptions, method, k, seed))["data"]
        return [GenerationResult.from_json(d, self.download(d["id"]) if download else None) for d in data]

    def lora(self, lora_id: str) -> GenerationResult:
        return GenerationResult.from_json(self._json(Call("GET", f"/v1/loras/{lora_id}")))

    def download(self, lora_id: str) -> AdapterFiles:
        """The LoRA's PEFT files; `.save_pretrained(directory)` writes what PEFT loads."""
        response = self._send(Call("GET", f"/v1/loras/{lora_id}/adapter"), stream=True)
        with tempfile.TemporaryFile(prefix="loragen-") as f:
            try:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            finally:
                response.close()
            f.seek(0)
            return AdapterFiles.from_zip(f)

    def search(self, description: str, k: int = 4, method: str | None = None) -> list[SearchHit]:
        data = self._json(Call("POST", "/v1/search", {"json": _Api.search_body(description, k, method)}))
        return [SearchHit.model_validate(h) for h in data["neighbours"]]

    @overload
    def complete(self, prompt: str, *, stream: Literal[False] = False, **options: Any) -> Completion: ...

    @overload
    def complete(self, prompt: str, *, stream: Literal[True], **options: Any) -> Iterator[CompletionChunk]: ...

    def complete(self, prompt: str, *, description: str | None = None, lora_id: str | None = None,
                 method: str = "weighted", max_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None, stop: str | list[str] | None = None,
                 stream: bool = False) -> Completion | Iterator[CompletionChunk]:
        """A completion of the raw `prompt` (no chat template; `chat` applies it). With `stream=True`,
        the chunks as they are decoded, the last one with the usage and no choices."""
        call = _Api.complete_call(prompt, description, lora_id, method, max_tokens, temperature, seed, stop, stream)
        if stream:
            return iter_chunks(self._send(call, stream=True), CompletionChunk)
        return Completion.from_json(self._json(call))

    @overload
    def chat(self, messages: Messages, *, stream: Literal[False] = False, **options: Any) -> ChatCompletion: ...

    @overload
    def chat(self, messages: Messages, *, stream: Literal[True], **options: Any) -> Iterator[ChatCompletionChunk]: ...

    def chat(self, messages: Messages, *, model: str | None = None, description: str | None = None,
             lora_id: str | None = None, method: str | None = None, examples: list[dict[str, str]] | None = None,
             max_tokens: int = 32, temperature: float = 0.0, top_p: float | None = None, n: int = 1,
             seed: int | None = None, stop: str | list[str] | None = None, stream: bool = False,
             include_usage: bool = False) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """A chat completion (`POST /v1/chat/completions`): `model` is the base model or a LoRA id, or
        `description` (with `examples`) generates the LoRA. With `stream=True`, the chunks as they are
        decoded; `include_usage` adds a last chunk with the usage and no choices."""
        options = chat_options(model, description, lora_id, method, examples, max_tokens, temperature, top_p, n,
                               seed, stop)
        call = _Api.chat_call(messages, options, stream, include_usage)
        if stream:
            return iter_chunks(self._send(call, stream=True), ChatCompletionChunk)
        return ChatCompletion.model_validate(self._json(call))

    def health(self) -> bool:
        return self._http.get("/readyz").is_success


class AsyncClient(_Api):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, max_retry_wait: float = 30.0) -> None:
        super().__init__(base_url, api_key, retries, backoff, max_retry_wait)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=httpx.AsyncHTTPTransport(retries=retries))
        self.experts = AsyncExperts(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(call.method, call.path, **call.kwargs)
            try:
                response = await self._http.send(request, stream=stream)
            except UNREACHABLE as exc:
                raise self.unreachable(exc) from exc
            if stream and not response.is_success:
                await response.aread()
            wait = self.retry_wait(response, attempt)
            if wait is None:
                break
            await response.aclose()
            await asyncio.sleep(wait)
            attempt += 1
        raise_for(response)
        return response

    async def _json(self, call: Call) -> Any:
        return (await self._send(call)).json()

    async def generate(self, description: str, *, method: str = "weighted", k: int | None = None,
                       seed: int | None = None, num_samples: int = 1, examples: list[dict[str, str]] | None = None,
                       download: bool = True) -> GenerationResult:
        data = await self._json(_Api.generate_call(description, method, k, seed, num_samples, examples))
        return GenerationResult.from_json(data, await self.download(data["id"]) if download else None)

    async def generate_batch(self, descriptions: list[str], *, method: str = "weighted", k: int | None = None,
                             seed: int | None = None, download: bool = False) -> list[GenerationResult]:
        data = (await self._json(_Api.batch_call(descriptions, method, k, seed)))["data"]
        return [GenerationResult.from_json(d, await self.download(d["id"]) if download else None) for d in data]

    async def lora(self, lora_id: str) -> GenerationResult:
        return GenerationResult.from_json(await self._json(Call("GET", f"/v1/loras/{lora_id}")))

    async def download(self, lora_id: str) -> AdapterFiles:
        """The LoRA's PEFT files; `.save_pretrained(directory)` writes what PEFT loads."""
        response = await self._send(Call("GET", f"/v1/loras/{lora_id}/adapter"), stream=True)
        with tempfile.TemporaryFile(prefix="loragen-") as f:
            try:
                async for chunk in response.aiter_bytes():
                    f.write(chunk)
            finally:
                await response.aclose()
            f.seek(0)
            return AdapterFiles.from_zip(f)

    async def search(self, description: str, k: int = 4, method: str | None = None) -> list[SearchHit]:
        data = await self._json(Call("POST", "/v1/search", {"json": _Api.search_body(description, k, method)}))
        return [SearchHit.model_validate(h) for h in data["neighbours"]]

    @overload
    async def complete(self, prompt: str, *, stream: Literal[False] = False, **options: Any) -> Completion: ...

    @overload
    async def complete(self, prompt: str, *, stream: Literal[True],
                       **options: Any) -> AsyncIterator[CompletionChunk]: ...

    async def complete(self, prompt: str, *, description: str | None = None, lora_id: str | None = None,
                       method: str = "weighted", max_tokens: int = 32, temperature: float = 0.0,
                       seed: int | None = None, stop: str | list[str] | None = None,
                       stream: bool = False) -> Completion | AsyncIterator[CompletionChunk]:
        """As `Client.complete`."""
        call = _Api.complete_call(prompt, description, lora_id, method, max_tokens, temperature, seed, stop, stream)
        if stream:
            return aiter_chunks(await self._send(call, stream=True), CompletionChunk)
        return Completion.from_json(await self._json(call))

    @overload
    async def chat(self, messages: Messages, *, stream: Literal[False] = False, **options: Any) -> ChatCompletion: ...

    @overload
    async def chat(self, messages: Messages, *, stream: Literal[True],
                   **options: Any) -> AsyncIterator[ChatCompletionChunk]: ...

    async def chat(self, messages: Messages, *, model: str | None = None, description: str | None = None,
                   lora_id: str | None = None, method: str | None = None,
                   examples: list[dict[str, str]] | None = None, max_tokens: int = 32, temperature: float = 0.0,
                   top_p: float | None = None, n: int = 1, seed: int | None = None,
                   stop: str | list[str] | None = None, stream: bool = False,
                   include_usage: bool = False) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        """As `Client.chat`; with `stream=True`, `async for chunk in await client.chat(..., stream=True)`."""
        options = chat_options(model, description, lora_id, method, examples, max_tokens, temperature, top_p, n,
                               seed, stop)
        call = _Api.chat_call(messages, options, stream, include_usage)
        if stream:
            return aiter_chunks(await self._send(call, stream=True), ChatCompletionChunk)
        return ChatCompletion.model_validate(await self._json(call))
