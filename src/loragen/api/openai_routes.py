"""OpenAI's dialect, as vLLM speaks it: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, each answered whole or, with `stream: true`, as server-sent events.

`model` names the base model or a LoRA that `/v1/models` lists; loragen's own extension,
`description` (with `examples` on the chat route), generates the LoRA on the fly. A completion's
`prompt` is raw text, as OpenAI and vLLM take it; a chat's messages are formatted by the base
model's chat template. A stream is OpenAI's chunks, one per decoded piece of a choice, then (with
`stream_options.include_usage`) one with the usage, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..adapters import Lora
from ..basemodel import Completed, Prompt
from ..errors import LoragenError
from .completions import Completion, new_completion_id
from .errors import ApiError, domain_status
from .schemas import (MIN_TEMPERATURE, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionOut,
                      ChatCompletionRequest, ChatDelta, ChatMessage, Choice, CompletionChunk, CompletionOut,
                      CompletionRequest, ModelCard, ModelList, Sampling, StreamChoice, Usage)
from .service import Service
from .streaming import Event

log = logging.getLogger(__name__)
STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "With stream: true, server-sent events ending with `data: [DONE]`."}}


@dataclass(frozen=True)
class Head:
    """What every chunk of one answer repeats."""

    id: str
    created: int
    model: str
    lora_id: str | None


def usage(done: list[Completed]) -> Usage:
    """The prompt counted once, as OpenAI counts it for n choices; every choice's tokens."""
    prompt, completion = done[0].prompt_tokens, sum(d.completion_tokens for d in done)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(chunk: BaseModel | dict[str, Any]) -> str:
    data = chunk.model_dump_json(exclude_none=True) if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {data}\n\n"


def rows(body: Sampling, prompt: Prompt, raw: bool, lora: Lora | None, max_tokens: int) -> list[Completion]:
    """One row per choice; sampled with a seed, choice i uses seed + i, so the choices differ."""
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    seeds = [body.seed + i if body.seed is not None and temperature > 0 else body.seed for i in range(body.n)]
    return [Completion(prompt, lora, max_tokens, temperature, s, body.stop_strings, raw, top_p=body.top_p)
            for s in seeds]


def install(app: FastAPI, service: Service) -> None:
    engine = service.completions

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The base model and every LoRA that can be named now, as vLLM lists its LoRA modules."""
        base = service.reg.spec.base_model
        cards = [ModelCard(id=base, created=service.started, root=base, parent=None)]
        cards += [ModelCard(id=key, created=stored.created, root=key, parent=base)
                  for key, stored in service.served_loras()]
        return ModelList(data=cards)

    async def lora_of(body: Sampling, examples: list[dict[str, str]] | None = None) -> tuple[Lora | None, str | None]:
        lora_id = body.lora_id
        if examples is not None and body.description is None:
            raise ApiError(422, "invalid_request", "examples need a description to generate the LoRA from")
        if body.model is not None and body.model != service.reg.spec.base_model:
            if body.lora_id is not None or body.description is not None:
                raise ApiError(422, "invalid_request", "model names a LoRA: give it there or as lora_id, "
                               "and no description")
            if body.model not in service.cache:
                raise ApiError(404, "not_found", f"model {body.model!r} is neither the base model nor a LoRA "
                               "served now (GET /v1/models lists both)")
            lora_id = body.model
        if lora_id is not None:
            return service.lookup(lora_id).lora, lora_id
        if body.description is not None:
            job = service.job(body.description, body.method, None, body.seed, 1, examples)
            stored, _, _ = await service.generate(job)
            return stored[0].lora, stored[0].info["id"]
        return None, None

    def head(body: Sampling, lora_id: str | None, prefix: str = "cmpl") -> Head:
        return Head(new_completion_id(prefix), int(time.time()), body.model or service.reg.spec.base_model, lora_id)

    async def streamed(todo: list[Completion], body: Sampling, first_chunks: list[BaseModel],
                       chunks: Callable[[Event], list[BaseModel]], usage_chunk: Callable[[Usage], BaseModel]) -> Any:
        events = engine.stream(todo)
        # The first piece is awaited before answering, so that an error before any text (the base
        # model unavailable) is an HTTP error, not an event.
        first = await anext(events, None)

        async def body_text() -> AsyncIterator[str]:
            done: list[Completed] = []
            try:
                for c in first_chunks:
                    yield sse(c)
                event = first
                while event is not None:
                    for c in chunks(event):
                        yield sse(c)
                    if event[1] == "done":
                        done.append(event[2])
                    event = await anext(events, None)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield sse(usage_chunk(usage(done)))
            except Exception as exc:  # the answer has begun: the error is an event of its own
                if isinstance(exc, LoragenError):
                    code, message = domain_status(exc)[1], str(exc)
                else:
                    log.exception("a streamed completion failed", exc_info=exc)
                    code, message = "internal_error", "the server failed on this request; see its log"
                yield sse({"error": {"code": code, "message": message}})
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_text(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", response_model=CompletionOut, responses=STREAMED)
    async def completions(body: CompletionRequest) -> Any:
        lora, lora_id = await lora_of(body)
        todo = rows(body, body.prompt, True, lora, body.max_tokens)
        h = head(body, lora_id)
        if body.stream:
            def chunk(choices: list[StreamChoice], use: Usage | None = None) -> CompletionChunk:
                return CompletionChunk(id=h.id, created=h.created, model=h.model, choices=choices, usage=use,
                                       lora_id=h.lora_id)

            def chunks(event: Event) -> list[BaseModel]:
                index, kind, value = event
                if kind == "text":
                    return [chunk([StreamChoice(text=value, index=index)])]
                return [chunk([StreamChoice(text="", index=index, finish_reason=value.finish_reason)])]

            return await streamed(todo, body, [], chunks, lambda u: chunk([], u))
        done = list(await asyncio.gather(*(engine.complete(r) for r in todo)))
        return CompletionOut(id=h.id, created=h.created, model=h.model, usage=usage(done), lora_id=h.lora_id,
                             choices=[Choice(text=d.text, index=i, finish_reason=d.finish_reason)  # type: ignore[arg-type]
                                      for i, d in enumerate(done)])

    @app.post("/v1/chat/completions", response_model=ChatCompletionOut, responses=STREAMED)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        examples = [e.model_dump() for e in body.examples] if body.examples is not None else None
        engine.check_chat()
        lora, lora_id = await lora_of(body, examples)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        todo = rows(body, messages, False, lora, body.max_completion_tokens or body.max_tokens)
        h = head(body, lora_id, "chatcmpl")
        if body.stream:
            def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=h.id, created=h.created, model=h.model, choices=choices, usage=use,
                                           lora_id=h.lora_id)

            def chunks(event: Event) -> list[BaseModel]:
                index, kind, value = event
                if kind == "text":
                    return [chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=value))])]
                return [chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=value.finish_reason)])]

            roles = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                     for i in range(len(todo))]
            return await streamed(todo, body, roles, chunks, lambda u: chunk([], u))
        done = list(await asyncio.gather(*(engine.complete(r) for r in todo)))
        choices = [ChatChoice(index=i, message=ChatMessage(content=d.text), finish_reason=d.finish_reason)  # type: ignore[arg-type]
                   for i, d in enumerate(done)]
        return ChatCompletionOut(id=h.id, created=h.created, model=h.model, choices=choices, usage=usage(done),
                                 lora_id=h.lora_id)
