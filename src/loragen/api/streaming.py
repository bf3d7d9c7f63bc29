"""Streamed completions: each row's text as it is decoded, handed from the model thread to the
event loop, where its request reads it from an asyncio queue.

A row's text is decoded afresh from its tokens at every step, and only what can no longer change
is handed out: the text before a stop string's first characters (a stop string may be split
across tokens, and so across steps), and never a trailing replacement character (a multi-byte
character still being spelled). When the batch ends, the row's last piece is the rest of its final
text, so the pieces always add up to what the same request gives unstreamed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..basemodel import Completed

Event = tuple[int, str, Any]  # (choice index, "text" | "done" | "error", a piece of text | Completed | exception)


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many of `text`'s last characters may be the start of one of the `stop` strings."""
    held = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


class RowStream:
    """One streamed row (a choice of a request). `push` runs on the model thread, `finish`, `fail`
    and `cancel` on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event], index: int,
                 stop: tuple[str, ...]) -> None:
        self.loop, self.queue, self.index, self.stop = loop, queue, index, stop
        self.tokens: list[int] = []
        self.emitted = 0  # characters handed out so far
        self.ended = False
        self.cancelled = False

    def _send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, value))

    def push(self, token: int, tokenizer: Any, eos: set[int]) -> None:
        if self.ended or self.cancelled:
            return
        if token in eos:
            self.ended = True
            return
        if token == tokenizer.pad_token_id:
            return
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.ended, safe = True, cut
        else:
            safe = len(text) - held_back(text, self.stop)
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > self.emitted:
            self._send("text", text[self.emitted:safe])
            self.emitted = safe

    def finish(self, done: Completed) -> None:
        rest = done.text[self.emitted:]
        if rest:
            self.queue.put_nowait((self.index, "text", rest))
        self.queue.put_nowait((self.index, "done", done))

    def fail(self, exc: BaseException) -> None:
        self.queue.put_nowait((self.index, "error", exc))


class BatchStreamer(BaseStreamer):
    """Given each decoding step's new token of every row, feeds the rows that stream."""

    def __init__(self, rows: list[RowStream | None], tokenizer: Any) -> None:
        self.rows, self.tokenizer = rows, tokenizer
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # generate hands the prompts over first
            return
        for row, token in zip(self.rows, value.tolist()):
            if row is not None:
                row.push(int(token), self.tokenizer, self.eos)

    def end(self) -> None:
        pass


class Cancelled(StoppingCriteria):
    """Ends the rows whose client went away; once every row has ended, the forward stops."""

    def __init__(self, rows: list[RowStream | None]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        flags = [r is not None and r.cancelled for r in self.rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
