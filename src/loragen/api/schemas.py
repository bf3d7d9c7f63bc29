"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..generator.example_evidence import EXAMPLES_FIT_THRESHOLD

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


class CompletionRequest(Strict):
    # Both a description and a lora_id are refused; the schema says so too.
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["description", "lora_id"],
        "properties": {"description": {"type": "string"}, "lora_id": {"type": "string"}}}})

    model: str | None = Field(default=None, min_length=1, max_length=1024, description=(
        "As in OpenAI's and vLLM's completions: the base model's id (no LoRA) or a LoRA's id, as "
        "GET /v1/models lists them. A LoRA here is the same as lora_id."))
    prompt: Text = Field(min_length=1, max_length=MAX_DESCRIPTION)
    description: Text | None = Field(default=None, min_length=1, max_length=MAX_DESCRIPTION)
    lora_id: str | None = Field(default=None, min_length=1, max_length=128,
                                description="A generated LoRA's id; not together with a description.")
    method: str = Method
    max_tokens: int = Field(default=32, ge=1, le=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0,
                               description=f"0 (or below {MIN_TEMPERATURE}) decodes greedily.")
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: Annotated[str, Field(min_length=1, max_length=64)] | list[Annotated[str, Field(
        min_length=1, max_length=64)]] | None = Field(default=None, max_length=4, description=(
            "Up to 4 strings: the text ends before the first one the model writes (finish_reason stop)."))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @model_validator(mode="after")
    def _one_lora(self) -> CompletionRequest:
        if self.description is not None and self.lora_id is not None:
            raise ValueError("give either description or lora_id, not both")
        return self


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
