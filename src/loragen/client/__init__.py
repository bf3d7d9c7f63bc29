"""The Python SDK for the loragen service: `Client` and `AsyncClient`."""

from .client import AsyncClient, Client
from .types import (AuthenticationError, BadRequestError, Completion, ConflictError, Expert, ExpertPage,
                    GenerationResult, LoragenAPIError, LoragenConnectionError, Neighbour, NotFoundError,
                    SearchHit, ServerError)

__all__ = ["AsyncClient", "AuthenticationError", "BadRequestError", "Client", "Completion", "ConflictError",
           "Expert", "ExpertPage", "GenerationResult", "LoragenAPIError", "LoragenConnectionError", "Neighbour",
           "NotFoundError", "SearchHit", "ServerError"]
