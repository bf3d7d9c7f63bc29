"""Request and response bodies of the HTTP API.

The answers the SDK also reads are defined in `loragen.schemas` and re-exported here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..schemas import (BatchOut, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionOut, ChatDelta,
                       ChatMessage, Choice, CompletionChunk, CompletionOut, ErrorBody, ErrorOut, ExpertList, ExpertOut, HitOut,
                       ImportedExpertOut, LoraOut, NeighbourOut, SearchOut, StreamChoice, Usage)

MAX_DESCRIPTION = 4000
MAX_BATCH = 256
MIN_TEMPERATURE = 1e-2  # dividing logits by less overflows them to inf, and sampling fails


def valid_unicode(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which no tokenizer accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
Description = Field(min_length=1, max_length=MAX_DESCRIPTION, description="What the LoRA should make the model do.")


Method = Field(default="weighted", min_length=1, max_length=64,
               description="nearest, weighted, topk, uniform, or a trained learned method (icm, sg).")


class Strict(BaseModel):
    """A request body: unknown fields are refused, and so is every type coercion (`"seed": false`
    is not 0, `"k": "2"` is not 2), so the body is valid exactly when its JSON schema says so."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ExamplePair(BaseModel):
    """One input/output pair; other keys are ignored, as the generators ignore them."""

    model_config = ConfigDict(strict=True)
    input: Text
    output: Text


class GenerateRequest(Strict):
    description: Text = Description
    method: str = Method
    k: int | None = Field(default=None, ge=1, le=64, description="Neighbours (retrieval methods).")
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    num_samples: int = Field(default=1, ge=1, le=16)
    examples: list[ExamplePair] | None = Field(
        default=None, max_length=64,
        description="Input/output pairs ({input, output}) the LoRA should reproduce. weighted, icm and sg score "
                    "the description's top experts by how well each explains them and re-weigh (each neighbour's "
                    "example_logprob); icm also adds its in-context task vector. Needs the base model locally.")


class BatchRequest(Strict):
    descriptions: list[Annotated[Text, Field(min_length=1, max_length=MAX_DESCRIPTION)]] = Field(
        min_length=1, max_length=MAX_BATCH)
    method: str = Method
    k: int | None = Field(default=None, ge=1, le=64)
    seed: int | None = Field(default=None, ge=0, lt=2**31)


class SearchRequest(Strict):
    description: Text = Description
    k: int = Field(default=4, ge=1, le=100)
    method: str | None = Field(default=None, min_length=1, max_length=64, description="Rank as this generation method does (icm and sg "
                               "score in their learned description space); omitted: the registry's own similarity.")


Stop = Annotated[str, Field(min_length=1, max_length=64)] | list[Annotated[str, Field(
    min_length=1, max_length=64)]] | None


class StreamOptions(Strict):
    include_usage: bool = Field(default=False, description="Send the token usage in a last chunk with no choices.")


class Sampling(Strict):
    """What the completions and the chat completions routes share: the model or LoRA, and how to decode."""

    # Both a description and a lora_id are refused; the schema says so too.
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["description", "lora_id"],
        "properties": {"description": {"type": "string"}, "lora_id": {"type": "string"}}}})

    model: str | None = Field(default=None, min_length=1, max_length=1024, description=(
        "As in OpenAI's and vLLM's completions: the base model's id (no LoRA) or a LoRA's id, as "
        "GET /v1/models lists them. A LoRA here is the same as lora_id."))
    description: Text | None = Field(default=None, min_length=1, max_length=MAX_DESCRIPTION, description=(
        "A task description: the LoRA is generated for it (or found in the cache), as POST /v1/loras does."))
    lora_id: str | None = Field(default=None, min_length=1, max_length=128,
                                description="A generated LoRA's id; not together with a description.")
    method: str = Method
    max_tokens: int = Field(default=32, ge=1, le=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0,
                               description=f"0 (or below {MIN_TEMPERATURE}) decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling (with a temperature).")
    n: int = Field(default=1, ge=1, le=8, description="Choices to return. With a seed, choice i samples with seed + i.")
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: Stop = Field(default=None, max_length=4, description=(
        "Up to 4 strings: the text ends before the first one the model writes (finish_reason stop)."))
    stream: bool = Field(default=False, description="Answer with server-sent events, OpenAI's chunks, "
                         "ended by `data: [DONE]`.")
    stream_options: StreamOptions | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @model_validator(mode="after")
    def _one_lora(self) -> Sampling:
        if self.description is not None and self.lora_id is not None:
            raise ValueError("give either description or lora_id, not both")
        return self


class CompletionRequest(Sampling):
    prompt: Text = Field(min_length=1, max_length=MAX_DESCRIPTION, description=(
        "The raw text the model continues; no chat template is applied (POST /v1/chat/completions applies it)."))


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessageIn(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, Field(max_length=MAX_DESCRIPTION)] | list[TextPart] = Field(
        description="Text, or OpenAI's list of text parts (joined).")
    name: str | None = Field(default=None, max_length=64)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=64, description=(
        "The conversation; the base model's chat template formats it, ending with the assistant's turn."))
    max_completion_tokens: int | None = Field(default=None, ge=1, le=256, description="OpenAI's newer name "
                                              "for max_tokens; it wins when both are given.")
    examples: list[ExamplePair] | None = Field(
        default=None, max_length=64, description="With a description: input/output pairs the LoRA should "
        "reproduce, as in POST /v1/loras.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loragen"
    root: str
    parent: str | None = Field(description="For a LoRA, the base model it applies to; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReadyOut(BaseModel):
    status: str
    registry: str
    components: dict[str, str]
    max_batch: int = Field(description="Most generation requests decoded together (1: no micro-batching).")
    max_wait_ms: float
    encoder_dtype: str = Field(description="The text encoder's compute dtype (`auto` resolved).")
    encoder_workers: int


__all__ = ["MAX_BATCH", "MAX_DESCRIPTION", "MIN_TEMPERATURE", "BatchOut", "BatchRequest", "ChatChoice",
           "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionOut", "ChatCompletionRequest", "ChatDelta",
           "ChatMessage", "ChatMessageIn", "Choice", "CompletionChunk", "CompletionOut", "CompletionRequest",
           "Sampling", "StreamChoice", "StreamOptions", "TextPart", "ErrorBody", "ErrorOut", "ExamplePair", "ExpertList", "ExpertOut", "GenerateRequest",
           "HitOut", "ImportedExpertOut", "LoraOut", "ModelCard", "ModelList", "NeighbourOut", "ReadyOut",
           "SearchOut", "SearchRequest", "Strict", "Text", "Usage", "valid_unicode"]
