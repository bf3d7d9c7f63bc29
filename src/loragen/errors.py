"""The root of loragen's user-facing errors: the CLI prints them as one line, the API as 4xx."""


class LoragenError(Exception):
    """Something the caller can fix: bad input, a missing file, a mismatched model."""
