"""The root of loragen's user-facing errors: the CLI prints them as one line, the API as 4xx.

The service raises the kinds below; the HTTP layer (`loragen.api.errors`) alone chooses the
status each one gets.
"""


class LoragenError(Exception):
    """Something the caller can fix: bad input, a missing file, a mismatched model."""


class UnknownMethodError(LoragenError, ValueError):
    """No generation method of that name."""


class NotFoundError(LoragenError, LookupError):
    """The thing named (a LoRA, an expert, a model) does not exist, or is no longer kept."""


class ConflictError(LoragenError):
    """The request clashes with what exists, e.g. an expert of that name."""


class NotReadyError(LoragenError):
    """The service is still starting; the same request can be sent again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(LoragenError):
    """A component the request needs (the base model) could not be loaded."""


class InvalidAdapterError(LoragenError, ValueError):
    """An uploaded adapter that is not one, or does not fit the registry."""


class LimitExceeded(LoragenError):
    """A request costs more than a configured limit allows (`limit` names the setting); it is
    refused before any work."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class OverBudget(LimitExceeded):
    """A request's estimated working memory is over the configured budget."""


class Overloaded(LoragenError):
    """The service cannot take the request now; it may be retried after `retry_after` seconds.
    `reason` says why (e.g. queue_full, not_ready, rate_limited)."""

    def __init__(self, message: str, retry_after: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after, self.reason = retry_after, reason


class DeadlineExceeded(LoragenError):
    """The request did not finish within its deadline; its work was dropped."""


class ReadOnlyError(LoragenError):
    """A write to a store that was opened read-only (a registry served by Ray Serve replicas)."""
