"""The root of loragen's user-facing errors: the CLI prints them as one line, the API as 4xx."""


class LoragenError(Exception):
    """Something the caller can fix: bad input, a missing file, a mismatched model."""


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


class Unavailable(LoragenError):
    """What the request names does not exist on this server (e.g. a learned method it has no
    trained generator for)."""
