"""The bodies the service answers with and the SDK reads: one definition for both.

Torch-free (pydantic only), so `loragen.client` can parse answers without the model stack. The
API's request bodies, and the answers only the API uses, live in `loragen.api.schemas`. Unknown
fields in an answer are ignored, so a client keeps working against a newer server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# The fit below which examples count as out of distribution: the generator's
# `example_evidence.EXAMPLES_FIT_THRESHOLD`, stated here for the schema's text (a test checks they agree).
EXAMPLES_FIT_THRESHOLD = 0.5


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable, e.g. invalid_request, not_found, unknown_method.")
    message: str = Field(description="What went wrong and what to fix.")


class ErrorOut(BaseModel):
    error: ErrorBody


class NeighbourOut(BaseModel):
    expert: str
    expert_id: int
    similarity: float
    weight: float
    example_logprob: float | None = Field(
        default=None, description="log p(the request's examples | this expert's LoRA); null without examples.")


class LoraOut(BaseModel):
    id: str
    method: str
    description: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    neighbours: list[NeighbourOut]
    ood: bool | None = Field(description="Out of distribution; null when the method does not assess it.")
    clipped: bool | None
    ambiguous: bool | None = Field(
        default=None, description="No expert holds 90 % of the weight, so the LoRA mixes tasks and rarely does "
                                  "any of them; examples usually settle it. Null for methods that mix by design.")
    examples_used: bool | None = Field(
        default=None, description="Whether examples re-weighed the neighbours; null when the method does not say.")
    examples_from_description: bool | None = Field(
        default=None, description="The examples used were input -> output pairs written in the description.")
    examples_fit: float | None = Field(
        default=None, description="exp(mean log p per output token of the examples) under the expert that explains "
                                  "them best; null without examples.")
    examples_ood: bool | None = Field(
        default=None, description=f"No expert of the registry explains the examples (examples_fit below "
                                  f"{EXAMPLES_FIT_THRESHOLD}); null without examples.")
    seed: int | None
    sample_ids: list[str] = Field(description="Every sample's id; more than one with num_samples > 1.")
    cached: bool
    timings: dict[str, float]


class BatchOut(BaseModel):
    data: list[LoraOut]


class HitOut(BaseModel):
    expert: str
    expert_id: int
    description: str
    similarity: float


class SearchOut(BaseModel):
    neighbours: list[HitOut]


class ExpertOut(BaseModel):
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


class ImportedExpertOut(ExpertOut):
    absent_modules: list[str] = Field(
        description="The registry's modules the uploaded adapter does not target: imported with zero ΔW.")


class ExpertList(BaseModel):
    data: list[ExpertOut]
    total: int
    offset: int
    limit: int


class Choice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended the text; length: max_tokens ran out first.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionOut(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    lora_id: str | None


class StreamChoice(BaseModel):
    """A piece of one choice's text in a streamed completion; the last piece has its finish_reason."""

    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (OpenAI's chunk of `text_completion`). With
    `stream_options.include_usage`, a last chunk has no choices and the usage."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    lora_id: str | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended the message; length: max_tokens ran out first.")


class ChatCompletionOut(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    lora_id: str | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (OpenAI's `chat.completion.chunk`): the
    first of each choice carries the role, the next ones pieces of the content, the last its
    finish_reason; with `stream_options.include_usage`, a last chunk has no choices and the usage."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    lora_id: str | None = None
