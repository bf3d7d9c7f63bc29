"""`create_app(settings)`: the FastAPI application serving generation, search, experts, and (in
`openai_routes`) models, completions and chat completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from pydantic import StringConstraints
from starlette.convertors import Convertor, register_url_convertor

from ..embeddings import TextEncoder
from ..errors import LoragenError
from ..generator import check_descriptions
from . import errors, experts, openai_routes
from .deadline import Deadline
from .errors import ApiError
from .guard import Guard
from .middleware import BodyLimit, RequestMetrics, key_checker
from .payloads import adapter_zip, weights_bytes
from .schemas import (MAX_DESCRIPTION, NONBLANK, BatchOut, BatchRequest, ErrorOut, ExpertList, ExpertOut,
                      GenerateRequest, ImportedExpertOut, LoraOut, ReadyOut, SearchOut, SearchRequest, valid_unicode)
from .service import Service, Stored, check_method
from .settings import ApiSettings

BINARY = {200: {"content": {"application/zip": {}, "application/octet-stream": {}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorOut, "description": "The request needs fixing; the message says how."},
    503: {"model": ErrorOut, "description": "Still starting (see /readyz; Retry-After), or the base model is "
          "unavailable."},
    504: {"model": ErrorOut, "description": "Not finished within the deadline (request_timeout_s); the work was "
          "dropped."},
}
Format = Literal["json", "zip", "safetensors"]


class LoraId(Convertor[str]):
    """A LoRA id in a path: any segment but "batch", so that GET /v1/loras/batch is a 405 of the
    batch route (Allow: POST), as the schema says, rather than a lookup of a LoRA named "batch"."""

    regex = "(?!batch$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("lora_id", LoraId())


def lora_out(stored: Stored, cached: bool, timings: dict[str, float]) -> LoraOut:
    return LoraOut(**stored.info, cached=cached, timings={k: round(v, 3) for k, v in timings.items()})


async def zip_response(stored: Stored) -> Response:
    data = await asyncio.to_thread(adapter_zip, stored.lora)  # serialising a big LoRA would stall the loop
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{stored.info["id"]}.zip"'})


async def safetensors_response(stored: Stored) -> Response:
    return Response(await asyncio.to_thread(weights_bytes, stored.lora), media_type="application/octet-stream")


def create_app(settings: ApiSettings | None = None, *, encoder: TextEncoder | None = None) -> FastAPI:
    """`encoder` lets a caller share an already loaded text encoder (tests, embedding servers)."""
    settings = settings or ApiSettings()
    service = Service(settings, encoder)
    guard = Guard(service)
    # Probes answer without a key, so that auth_all_routes leaves liveness and readiness checks working.
    require_key = key_checker(settings.api_keys, guard.rate.request, public=frozenset({"/healthz", "/readyz"}))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    locked = settings.auth_all_routes and bool(settings.api_keys)
    app = FastAPI(title="loragen", summary="Task description in, LoRA out.", lifespan=lifespan, responses=ERRORS,
                  dependencies=[Depends(require_key)] if locked else [],
                  openapi_url=None if locked else "/openapi.json", docs_url=None if locked else "/docs",
                  redoc_url=None if locked else "/redoc")
    if locked:  # FastAPI's own docs routes skip app dependencies; these do not
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="loragen")
    app.state.service = service
    errors.install(app, service.metrics.refused)
    app.add_middleware(Deadline, timeout_s=settings.request_timeout_s, metrics=service.metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    writes = [Depends(require_key)]
    generation_slot, completion_slot = Depends(guard.slot(guard.generation)), Depends(guard.slot(guard.completion))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyOut,
             responses={503: {"model": ErrorOut, "description": "Not ready yet, or a component failed to load."}})
    async def readyz() -> ReadyOut:
        """200 once the registry, the text encoder, the generators and the base model are loaded and warm."""
        if not service.ready:
            raise ApiError(503, "not_ready", f"not ready: {service.readiness.pending() or 'shutting down'}",
                           {"Retry-After": "1"})
        return ReadyOut(status="ready", registry=str(service.reg.path), components=dict(service.readiness.state),
                        max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                        encoder_dtype=service.reg.encoder.compute_dtype, encoder_workers=settings.encoder_workers)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/loras", response_model=LoraOut, responses=BINARY)
    async def create_lora(body: GenerateRequest, request: Request, format: Format | None = None) -> Any:
        started = time.perf_counter()
        fmt = format or ("zip" if "application/zip" in request.headers.get("accept", "") else "json")
        examples = [e.model_dump() for e in body.examples] if body.examples is not None else None
        job = service.job(body.description, body.method, body.k, body.seed, body.num_samples, examples)
        if fmt != "json" and job.num_samples > 1:
            raise ApiError(400, "bad_request", "num_samples > 1 returns metadata only; download each of its "
                           "sample_ids from /v1/loras/{id}/adapter")
        pairs = [(e.input, e.output) for e in body.examples or ()]
        nbytes = guard.limits().generation(job.num_samples, pairs)
        async with guard.generation.slot():
            guard.generated(request, nbytes)
            stored, cached, seconds = await service.generate(job)
        if fmt == "zip":
            return await zip_response(stored[0])
        if fmt == "safetensors":
            return await safetensors_response(stored[0])
        total = time.perf_counter() - started
        return lora_out(stored[0], cached, {"generate_ms": seconds * 1e3, "total_ms": total * 1e3})

    @app.post("/v1/loras/batch", response_model=BatchOut)
    async def create_batch(body: BatchRequest, request: Request) -> BatchOut:
        check_method(body.method)  # an unknown method is the request's error, not one description's
        service.life.check_serves(body.method)  # nor a method still training
        nbytes = guard.limits().batch(body.descriptions)
        jobs = []
        for i, description in enumerate(body.descriptions):
            try:
                jobs.append(service.job(description, body.method, body.k, body.seed))
            except LoragenError as exc:
                raise ApiError(400, "bad_request", f"descriptions[{i}]: {exc}") from exc
        async with guard.generation.slot():
            guard.generated(request, nbytes)
            results = await service.generate_many(jobs)
        return BatchOut(data=[lora_out(stored[0], False, {"generate_ms": s * 1e3}) for stored, s in results])

    @app.get("/v1/loras/{lora_id:lora_id}", response_model=LoraOut)
    async def get_lora(lora_id: str) -> LoraOut:
        return lora_out(service.lookup(lora_id), True, {})

    @app.get("/v1/loras/{lora_id}/adapter", responses=BINARY)
    async def get_adapter(lora_id: str, format: Literal["zip", "safetensors"] = "zip") -> Response:
        stored = service.lookup(lora_id)
        if format == "safetensors":
            return await safetensors_response(stored)
        return await zip_response(stored)

    @app.post("/v1/search", response_model=SearchOut, dependencies=[generation_slot])
    async def search(body: SearchRequest) -> SearchOut:
        description = check_descriptions([body.description])[0]
        hits = (await service.in_engine(service.search, description, body.k, body.method))[0]
        return SearchOut(neighbours=[{"expert": h.name, "expert_id": h.expert_id, "description": h.description,
                                      "similarity": h.similarity} for h in hits])  # type: ignore[misc]

    @app.get("/v1/experts", response_model=ExpertList, dependencies=[generation_slot])
    async def list_experts(offset: Annotated[int, Query(ge=0)] = 0,
                           limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Any:
        return await service.in_engine(experts.page, service, offset, limit)

    @app.get("/v1/experts/{key}", response_model=ExpertOut, dependencies=[generation_slot])
    async def get_expert(key: str) -> Any:
        return experts.expert_out(await service.in_engine(experts.find, service, key))

    @app.delete("/v1/experts/{key}", dependencies=[*writes, generation_slot])
    async def delete_expert(key: str) -> dict[str, Any]:
        return await service.in_engine(experts.remove, service, key)

    @app.post("/v1/experts", response_model=ImportedExpertOut, status_code=201,
              dependencies=[*writes, generation_slot])
    async def add_expert(
        name: Annotated[str, Form(min_length=1, max_length=200)],
        description: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_DESCRIPTION,
                                                                     pattern=NONBLANK)]],
                               Form(min_length=1, max_length=64)],
        adapter_config: Annotated[UploadFile, File(description="adapter_config.json of a PEFT LoRA on the "
                                                   "registry's base model (else 400 invalid_adapter).")],
        adapter_model: Annotated[UploadFile, File(description="adapter_model.safetensors, its weights (else 400 "
                                                  "invalid_adapter).")],
        tags: Annotated[list[str], Form()] = [],  # noqa: B006 (FastAPI copies defaults)
    ) -> Any:
        for i, d in enumerate(description):
            if not d.strip() or len(d) > MAX_DESCRIPTION:
                raise ApiError(422, "invalid_request", f"description[{i}] must have 1 to {MAX_DESCRIPTION} characters")
        try:
            for text in (name, *description, *tags):
                valid_unicode(text)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        config, weights = await adapter_config.read(), await adapter_model.read()
        return await service.in_engine(experts.add, service, name, description, tags, config, weights,
                                       adapter_model.filename)

    openai_routes.install(app, service, guard)
    return app
