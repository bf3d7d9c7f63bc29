"""The base LLM: loading with the real `from_pretrained`, prompt formatting, greedy completion.

A prompt is the tokenizer's chat template applied to the input when the tokenizer has one (the
demo model's template is `{input}=`), else the raw input. Training, evaluation and serving all
format prompts here, so an expert sees at generation time exactly what it saw in training.
`completions` also takes a raw prompt, tokenized as is with the tokenizer's special tokens (as
OpenAI's and vLLM's completions do), and a chat's messages, which the template formats.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, Unpack

import torch
from torch import nn

from .adapters import Lora, LoraStack, applied
from .errors import LoragenError


class BaseModelError(LoragenError, ValueError):
    """The base model cannot be loaded or used as asked."""


Messages = list[dict[str, str]]  # a chat: {"role", "content"} per message
Prompt = str | Messages


class CompletionOptions(TypedDict, total=False):
    """`BaseModel.completions`' keyword arguments, which `complete` passes on."""

    loras: list[Lora | None] | None
    max_new_tokens: int
    temperature: float
    seed: int | None
    stop: Sequence[str]
    top_p: float
    raw: bool | Sequence[bool]
    streamer: Any
    criteria: Sequence[Any]


class Completed(NamedTuple):
    text: str
    finish_reason: str  # "stop": the model ended it; "length": max_new_tokens ran out first
    prompt_tokens: int
    completion_tokens: int  # the end-of-sequence token included, as OpenAI counts


@dataclass
class BaseModel:
    """`complete`, `completions`, `output_logprobs` and `last_hidden_states` hold `lock` while they
    run: per-row LoRAs are forward hooks on the shared modules, so one thread's hooks would reach
    another's forward."""

    model: nn.Module
    tokenizer: Any
    path: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> BaseModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).exists():
            raise BaseModelError(f"no base model at {path} (a local directory in Hugging Face format)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"cannot load the base model at {path}: {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model.to(device).eval(), tokenizer, str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            ))
        return text

    def prompt_ids(self, prompt: Prompt, raw: bool = False) -> list[int]:
        """The token ids a completion starts from: a chat's messages formatted by the chat template,
        a raw text as is (with the tokenizer's special tokens, e.g. a leading BOS), or else `prompt(text)`."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            if not getattr(tok, "chat_template", None):
                raise BaseModelError("the base model's tokenizer has no chat template; send a raw prompt "
                                     "to the completions route instead")
            text = str(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if raw:
            return list(tok(prompt, add_special_tokens=True)["input_ids"])
        return list(tok(self.prompt(prompt), add_special_tokens=False)["input_ids"])

    def encode_pairs(self, inputs: list[str], outputs: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+output+eos ids, with labels = -100 outside the output tokens."""
        return self.pad_pairs(self.pair_ids(inputs, outputs))

    def pair_ids(self, inputs: list[str], outputs: list[str]) -> list[tuple[list[int], list[int]]]:
        """Per pair: the prompt+output+eos ids, and their labels (-100 on the prompt)."""
        tok = self.tokenizer
        pairs = []
        for x, y in zip(inputs, outputs):
            p = tok(self.prompt(x), add_special_tokens=False)["input_ids"]
            o = tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            pairs.append((p + o, [-100] * len(p) + o))
        return pairs

    def pad_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """`pair_ids`' rows, right-padded to the longest: input_ids, attention_mask and labels."""
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        lab = torch.full((len(pairs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (r, l) in enumerate(pairs):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(l)] = torch.tensor(l)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    @torch.no_grad()
    def output_logprobs(self, inputs: list[str], outputs: list[str], *, stack: LoraStack | None = None,
                        rows: list[int] | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the summed log-probability of the output's tokens (eos included) after the
        prompt, and their count. Row i uses LoRA `rows[i]` of `stack` (-1 or no stack: none)."""
        with self.lock:
            return self._output_logprobs(inputs, outputs, stack, rows, batch_size)

    def _output_logprobs(self, inputs: list[str], outputs: list[str], stack: LoraStack | None,
                         rows: list[int] | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        total, count = torch.zeros(len(inputs), dtype=torch.float64), torch.zeros(len(inputs), dtype=torch.long)
        for start in range(0, len(inputs), batch_size):
            part = slice(start, start + batch_size)
            enc = {k: v.to(self.device) for k, v in self.encode_pairs(inputs[part], outputs[part]).items()}
            forward = lambda: self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # noqa: E731
            if stack is None or rows is None:
                logits = forward()
            else:
                with applied(self.model, stack) as r:
                    r.set(rows[part])
                    logits = forward()
            labels = enc["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            total[part], count[part] = token.sum(1).double().cpu(), mask.sum(1).cpu()
        return total, count

    @torch.no_grad()
    def last_hidden_states(self, inputs: list[str], outputs: list[str]) -> torch.Tensor:
        """(pairs, hidden): the last layer's state at the eos after each output (ICM-LoRA's task vector)."""
        enc = self.encode_pairs(inputs, outputs)
        mask = enc["attention_mask"].to(self.device)
        with self.lock:
            out = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask, output_hidden_states=True)
        last = mask.sum(dim=1) - 1  # right-padded: the eos after the output
        return out.hidden_states[-1][torch.arange(len(inputs)), last]

    def complete(self, inputs: Sequence[Prompt], **options: Unpack[CompletionOptions]) -> list[str]:
        """Complete each input, row i with `loras[i]` applied per row (shared weights untouched). A row
        ends at the end-of-sequence token or before the first of the `stop` strings it writes."""
        return [c.text for c in self.completions(inputs, **options)]

    @torch.no_grad()
    def completions(
        self,
        inputs: Sequence[Prompt],
        *,
        loras: list[Lora | None] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        top_p: float = 1.0,
        raw: bool | Sequence[bool] = False,
        streamer: Any = None,
        criteria: Sequence[Any] = (),
    ) -> list[Completed]:
        """As `complete`, with each row's finish reason and token counts, as OpenAI's and vLLM's
        completions give them. `raw` (one for all rows, or one per row) takes a text prompt as is
        (see `prompt_ids`). `streamer` (a transformers streamer) is given each step's new token of
        every row; `criteria` are further transformers stopping criteria, which may end single rows.
        `top_p` below 1 samples from the nucleus (with a temperature above 0)."""
        rows = [raw] * len(inputs) if isinstance(raw, bool) else list(raw)
        with self.lock:
            ids = [self.prompt_ids(x, r) for x, r in zip(inputs, rows)]
            return self._complete(ids, loras, max_new_tokens, temperature, seed, list(stop), top_p, streamer,
                                  list(criteria))

    def _stop_criterion(self, stop: list[str]) -> Any:
        """One criterion for the stop strings the model's vocabulary can spell, or None: transformers
        refuses the others, and the model can never write them, so they can never end a text."""
        from transformers import StopStringCriteria

        kept = []
        for text in stop:
            try:
                StopStringCriteria(self.tokenizer, [text])
            except ValueError:
                continue
            kept.append(text)
        return StopStringCriteria(self.tokenizer, kept) if kept else None

    def _left_padded(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _complete(self, prompts: list[list[int]], loras: list[Lora | None] | None, max_new_tokens: int,
                  temperature: float, seed: int | None, stop: list[str], top_p: float, streamer: Any,
                  criteria: list[Any]) -> list[Completed]:
        tok = self.tokenizer
        enc = self._left_padded(prompts)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                                  "eos_token_id": tok.eos_token_id, "streamer": streamer}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
            if top_p < 1:
                kwargs.update(top_p=top_p)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False)
        criterion = self._stop_criterion(stop)
        if criterion is not None:  # built once here, not again inside generate
            criteria = [criterion, *criteria]
        if criteria:
            from transformers import StoppingCriteriaList

            kwargs.update(stopping_criteria=StoppingCriteriaList(criteria))
        present = [lo for lo in (loras or []) if lo is not None]
        if not present:
            out = self.model.generate(**enc, **kwargs)
        else:
            stack = LoraStack.from_loras([lo.to(device=self.device) for lo in present])
            index, n = [], 0
            for lo in loras or []:
                index.append(-1 if lo is None else n)
                n += lo is not None
            with applied(self.model, stack) as rows:
                rows.set(index)
                out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        eos = [] if tok.eos_token_id is None else tok.eos_token_id  # an int, or a list of them
        ended = torch.isin(new, torch.as_tensor(eos, dtype=new.dtype, device=new.device))
        if stop and tok.pad_token_id is not None:  # a row a stop string ended is padded from there on
            ended |= new == tok.pad_token_id
        finished = ended.any(dim=1)
        lengths = torch.where(finished, ended.int().argmax(dim=1), new.shape[1]).tolist()
        prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
        done = []
        for row, fin, p, n in zip(new, finished.tolist(), prompt_lengths, lengths):
            text = tok.decode(row, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:  # generated up to the stop string's last token, which is counted; the text ends before it
                done.append(Completed(text[:cut], "stop", p, n))
            else:  # the end-of-sequence token is counted, as OpenAI does
                done.append(Completed(text, "stop" if fin else "length", p, n + fin))
        return done
