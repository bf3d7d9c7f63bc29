"""The Python SDK for the loragen service: `Client` and `AsyncClient`.

Importing it needs httpx and pydantic only, never torch: a downloaded LoRA is `AdapterFiles`, the
PEFT adapter's files, which `save_pretrained` writes as the directory PEFT loads.
"""

from .adapter import AdapterFiles
from .client import AsyncClient, Client
from .types import (AuthenticationError, BadRequestError, ChatCompletion, ChatCompletionChunk, Completion,
                    CompletionChunk, ConflictError, Expert, ExpertPage,
                    GenerationResult, ImportedExpert, LoragenAPIError, LoragenConnectionError, Neighbour,
                    NotFoundError, RateLimitError, SearchHit, ServerError)

__all__ = ["AdapterFiles", "AsyncClient", "AuthenticationError", "BadRequestError", "ChatCompletion",
           "ChatCompletionChunk", "Client", "Completion", "CompletionChunk",
           "ConflictError", "Expert", "ExpertPage", "GenerationResult", "ImportedExpert", "LoragenAPIError",
           "LoragenConnectionError", "Neighbour", "NotFoundError", "RateLimitError", "SearchHit", "ServerError"]
