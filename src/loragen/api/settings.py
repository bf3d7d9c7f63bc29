"""The service's settings: the shared `Settings` plus what only the HTTP server needs.

Same sources as `Settings` (`LORAGEN_*` environment variables, then the TOML file); a list such as
`LORAGEN_API_KEYS` is given as JSON, e.g. `'["key-1", "key-2"]'`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Settings


class ApiSettings(Settings):
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    max_batch: int = Field(default=32, ge=1, description="Most generation requests decoded together.")
    max_wait_ms: float = Field(default=10.0, ge=0, description="Longest a request waits for others to batch with; "
                               "it waits only while its batch is smaller than the largest of the last few.")
    cache_bytes: int = Field(default=256 * 2**20, ge=0, description="Bytes of generated LoRAs kept in memory.")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty: no auth.")
    auth_all_routes: bool = Field(default=False, description="Require a key on every route, not only writes.")
    registry_read_only: bool = Field(default=False, description="Open the registry read-only (SQLite mode=ro): "
                                     "adding or removing experts answers 405; it still sees other processes' writes.")
    encoder_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Text encoder compute dtype. auto: bfloat16 where the CPU computes it "
        "natively (AVX512-BF16, AMX), else float32. bfloat16 is about twice as fast; its embeddings (and so "
        "neighbour weights) differ from float32's in the 4th-5th digit (cosine > 0.9999).")
    encoder_workers: int = Field(
        default=2, ge=1, le=64, description="Single-threaded workers one text-encoding batch is split across "
        "(CPU); 1: one call on torch's intra-op threads. Results are the same; under load the split is faster.")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1, description="Largest request body accepted.")
    # Admission control, deadlines and per-request cost limits: see README, "Limits".
    max_concurrent_requests: int = Field(
        default=32, ge=1, description="Requests each engine (generation; completions) works on at once; the "
        "micro-batcher coalesces them, so keep it at least max_batch.")
    max_queued_requests: int = Field(
        default=64, ge=0, description="Requests waiting per engine beyond max_concurrent_requests; past it "
        "429 with Retry-After.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Each request's deadline: past it 504, "
                                     "and its work is dropped.")
    max_example_chars: int = Field(default=16384, ge=1, description="Total characters of a request's examples.")
    max_example_tokens: int = Field(default=4096, ge=1, description="Total prompt and output tokens of a "
                                    "request's examples; each example must also fit the base model's context.")
    max_batch_chars: int = Field(default=65536, ge=1, description="Total characters of a batch's descriptions "
                                 "(batch size x description length).")
    max_generated_bytes: int = Field(default=64 * 2**20, ge=1, description="Bytes of LoRA weights one request "
                                     "may generate (samples or batch items x adapter size).")
    memory_budget_bytes: int = Field(default=2 * 2**30, ge=1, description="Estimated working memory one request "
                                     "may need (examples x tokens x layers; batch x adapter bytes); past it 413.")
    rate_limit_rps: float = Field(default=0.0, ge=0, description="Requests per second per API key (token "
                                  "bucket, bursts of rate_limit_burst); 0: no limit.")
    rate_limit_burst: int = Field(default=20, ge=1, description="Requests a key may send at once.")
    rate_limit_bytes_per_min: int = Field(default=0, ge=0, description="Generated LoRA bytes per minute per "
                                          "API key; 0: no limit.")
