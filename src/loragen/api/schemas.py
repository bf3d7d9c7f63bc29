"""Request and response bodies of the HTTP API.

The answers the SDK also reads are defined in `loragen.schemas` and re-exported here."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ..generator import METHODS
from ..schemas import (BatchOut, Choice, CompletionOut, ErrorBody, ErrorOut, ExpertList, ExpertOut, HitOut,
                       ImportedExpertOut, LoraOut, NeighbourOut, SearchOut, Usage)

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

# Not blank: a character Python's str.strip() keeps (\s as Python reads it, which the server's
# validator lacks for \x1c-\x1f).
NONBLANK = r"[^\s\x1c-\x1f]"
NonBlank = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DESCRIPTION, pattern=NONBLANK),
                     AfterValidator(valid_unicode)]
Description = Field(min_length=1, max_length=MAX_DESCRIPTION, pattern=NONBLANK,
                    description="What the LoRA should make the model do.")


Method = Field(default="weighted", min_length=1, max_length=64, json_schema_extra={"enum": list(METHODS)},
               description="nearest, weighted, topk, uniform, multitask, or a learned method (icm, sg) the server "
                           "has a trained generator for.")


class Strict(BaseModel):
    """A request body: unknown fields are refused, and so is every type coercion (`"seed": false`
    is not 0, `"k": "2"` is not 2), so the body is valid exactly when its JSON schema says so."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral(cls, data: Any) -> Any:
        """JSON Schema's integers include 2.0, so an integer field takes 2.0 as 2 (never 2.5 or a bool)."""
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items() if f.annotation is int or int in get_args(f.annotation)}
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


class ExamplePair(BaseModel):
    """One input/output pair; other keys are ignored, as the generators ignore them."""

    model_config = ConfigDict(strict=True)
    input: Text = Field(max_length=MAX_DESCRIPTION)
    output: Text = Field(max_length=MAX_DESCRIPTION)


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
                    "example_logprob); icm also adds its in-context task vector. Needs the base model locally. "
                    "Limits (422 limit_exceeded past them): their total characters (max_example_chars, default "
                    "16384) and tokens (max_example_tokens, default 4096); each example's prompt, output and "
                    "end of text within the base model's context.")


class BatchRequest(Strict):
    descriptions: list[NonBlank] = Field(
        min_length=1, max_length=MAX_BATCH, description="Their total characters, batch size x description length, "
        "are limited too (max_batch_chars, default 65536; 422 limit_exceeded past it).")
    method: str = Method
    k: int | None = Field(default=None, ge=1, le=64)
    seed: int | None = Field(default=None, ge=0, lt=2**31)


class SearchRequest(Strict):
    description: Text = Description
    k: int = Field(default=4, ge=1, le=100)
    method: str | None = Field(default=None, min_length=1, max_length=64,
                               json_schema_extra={"enum": [*METHODS, None]}, description="Rank as this generation method does (icm and sg "
                               "score in their learned description space); omitted: the registry's own similarity.")


class CompletionRequest(Strict):
    # Both a description and a lora_id are refused; the schema says so too.
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["description", "lora_id"],
        "properties": {"description": {"type": "string"}, "lora_id": {"type": "string"}}}})

    model: str | None = Field(default=None, min_length=1, max_length=1024, description=(
        "As in OpenAI's and vLLM's completions: the base model's id (no LoRA) or a LoRA's id, as "
        "GET /v1/models lists them. A LoRA here is the same as lora_id."))
    prompt: Text = Field(min_length=1, max_length=MAX_DESCRIPTION, description=(
        "Its tokens plus max_tokens must fit the base model's context (422 limit_exceeded)."))
    description: NonBlank | None = None
    lora_id: str | None = Field(default=None, min_length=1, max_length=128,
                                description="A generated LoRA's id; not together with a description.")
    method: str = Method
    max_tokens: int = Field(default=32, ge=1, le=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0,
                               description=f"0 (or below {MIN_TEMPERATURE}) decodes greedily.")
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: Annotated[str, Field(min_length=1, max_length=64)] | Annotated[list[Annotated[str, Field(
        min_length=1, max_length=64)]], Field(max_length=4)] | None = Field(default=None, description=(
            "Up to 4 strings: the text ends before the first one the model writes (finish_reason stop)."))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @model_validator(mode="after")
    def _one_lora(self) -> CompletionRequest:
        if self.description is not None and self.lora_id is not None:
            raise ValueError("give either description or lora_id, not both")
        return self


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


__all__ = ["MAX_BATCH", "MAX_DESCRIPTION", "MIN_TEMPERATURE", "NONBLANK", "BatchOut", "BatchRequest", "Choice", "CompletionOut",
           "CompletionRequest", "ErrorBody", "ErrorOut", "ExamplePair", "ExpertList", "ExpertOut", "GenerateRequest",
           "HitOut", "ImportedExpertOut", "LoraOut", "ModelCard", "ModelList", "NeighbourOut", "ReadyOut",
           "SearchOut", "SearchRequest", "Strict", "Text", "Usage", "valid_unicode"]
