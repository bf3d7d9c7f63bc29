"""OpenAI's dialect on a live server, spoken by the real `openai` client and by the SDK: chat
completions (base model, LoRA id, description), raw-prompt completions, and streaming on both
routes (text equal to the unstreamed text, usage, stop strings across chunks, disconnects)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import uvicorn_server

from loragen.api import ApiSettings, create_app
from loragen.basemodel import BaseModel
from loragen.client import AsyncClient, ChatCompletion, ChatCompletionChunk, Client, CompletionChunk
from loragen.embeddings import TextEncoder

USER = [{"role": "user", "content": "abcde"}]


@pytest.fixture(scope="module")
def served(world: Path, encoder: TextEncoder):
    settings = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home-openai",
                           max_wait_ms=20, encoder_dtype="float32")
    app = create_app(settings, encoder=encoder)
    with uvicorn_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def oa(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base(world: Path) -> BaseModel:
    """The library's own model, to hold the service's texts to."""
    from loragen.registry import Registry

    return BaseModel.load(Registry.open(world / "registry").spec.base_model)  # the path the server names it by


@pytest.fixture(scope="module")
def lora_id(url: str) -> str:
    with Client(url) as c:
        return c.generate("english to french", download=False).id


def lora_of(url: str, lora_id: str):
    with Client(url) as c:
        return c.download(lora_id).to_lora()


def streamed_text(chunks: list, kind: str = "chat") -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if kind == "chat" else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
    return texts


def test_chat_with_the_base_model_applies_the_chat_template(oa: openai.OpenAI, base: BaseModel) -> None:
    done = oa.chat.completions.create(model=base.path, messages=USER, max_tokens=8, temperature=0)
    want = base.completions(["abcde"], max_new_tokens=8)[0]  # the library templates a user's text
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-") and done.model == base.path
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert done.usage.prompt_tokens == len("abcde") + 2  # <bos>, the text, then the separator


def test_chat_with_a_lora_id_and_with_a_description(oa: openai.OpenAI, url: str, lora_id: str,
                                                    base: BaseModel) -> None:
    by_id = oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=8, temperature=0)
    want = base.completions(["abcde"], loras=[lora_of(url, lora_id)], max_new_tokens=8)[0]
    assert by_id.model == lora_id and by_id.choices[0].message.content == want.text
    plain = oa.chat.completions.create(model=base.path, messages=USER, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content != want.text  # the LoRA changes the answer
    described = oa.chat.completions.create(model=base.path, messages=USER, max_tokens=8, temperature=0,
                                           extra_body={"description": "english to french"})
    assert described.lora_id == lora_id  # the same description gives the same LoRA
    assert described.choices[0].message.content == want.text
    two = oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1] and 2 <= two.usage.completion_tokens <= 16
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="lora-nowhere", messages=USER, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model=base.path, messages=[], max_tokens=2)


def test_completions_take_the_prompt_raw(oa: openai.OpenAI, base: BaseModel) -> None:
    raw = oa.completions.create(model=base.path, prompt="abcde", max_tokens=8, temperature=0)
    assert raw.usage.prompt_tokens == len("abcde")  # no <bos>, no separator: the text as it is
    assert raw.choices[0].text == base.completions(["abcde"], max_new_tokens=8, raw=True)[0].text
    # The templated prompt, sent as text, is what the chat route gives the model.
    templated = oa.completions.create(model=base.path, prompt=base.prompt("abcde"), max_tokens=8, temperature=0)
    chat = oa.chat.completions.create(model=base.path, messages=USER, max_tokens=8, temperature=0)
    assert templated.usage.prompt_tokens == chat.usage.prompt_tokens == len("abcde") + 2
    assert templated.choices[0].text == chat.choices[0].message.content


def test_streaming_gives_the_unstreamed_text_on_both_routes(oa: openai.OpenAI, lora_id: str) -> None:
    for model in (oa.models.list().data[0].id, lora_id):
        whole = oa.chat.completions.create(model=model, messages=USER, max_tokens=16, temperature=0)
        chunks = list(oa.chat.completions.create(model=model, messages=USER, max_tokens=16, temperature=0,
                                                 stream=True))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert streamed_text(chunks) == {0: whole.choices[0].message.content}
        assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert all(c.usage is None for c in chunks)

        whole = oa.completions.create(model=model, prompt="abcde", max_tokens=16, temperature=0)
        chunks = list(oa.completions.create(model=model, prompt="abcde", max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
        assert streamed_text(chunks, "text") == {0: whole.choices[0].text}
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last chunk


def test_chat_streams_include_usage_and_every_choice(oa: openai.OpenAI, lora_id: str) -> None:
    whole = oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=12, temperature=0, n=2)
    chunks = list(oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=12, temperature=0, n=2,
                                             stream=True, stream_options={"include_usage": True}))
    assert streamed_text(chunks) == {i: c.message.content for i, c in enumerate(whole.choices)}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len("abcde") + 2  # the prompt counted once for both choices


def test_a_stop_string_split_across_chunks_holds(oa: openai.OpenAI, base: BaseModel, lora_id: str) -> None:
    whole = oa.completions.create(model=lora_id, prompt="abcde", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    assert len(text) >= 4, text
    stop = text[2:4]  # two characters: two tokens of the demo tokenizer, so two steps and two chunks
    cut = text.find(stop)
    chunks = list(oa.completions.create(model=lora_id, prompt="abcde", max_tokens=16, temperature=0, stop=[stop],
                                        stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == text[:cut] and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop[0] in p and text[:cut].count(stop[0]) == 0 for p in pieces)  # never sent, then taken back
    unstreamed = oa.completions.create(model=lora_id, prompt="abcde", max_tokens=16, temperature=0, stop=[stop])
    assert unstreamed.choices[0].text == text[:cut] and unstreamed.choices[0].finish_reason == "stop"
    chat = list(oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=16, temperature=0, stop=[stop],
                                           stream=True))
    chat_whole = oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=16, temperature=0, stop=[stop])
    assert streamed_text(chat) == {0: chat_whole.choices[0].message.content}


def test_streamed_rows_batch_with_other_requests(url: str, lora_id: str) -> None:
    prompts = ["abc", "abcd", "hello", "xyz"]

    async def run() -> tuple[list, list]:
        aoa = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def stream(p: str) -> str:
            out = ""
            async for c in await aoa.completions.create(model=lora_id, prompt=p, max_tokens=8, temperature=0,
                                                        stream=True):
                out += c.choices[0].text if c.choices else ""
            return out

        async def whole(p: str) -> str:
            return (await aoa.completions.create(model=lora_id, prompt=p, max_tokens=8, temperature=0)).choices[0].text

        both = await asyncio.gather(*(stream(p) for p in prompts), *(whole(p) for p in prompts))
        return list(both[:4]), list(both[4:])

    before = _batch_sizes(url)
    streamed, whole = asyncio.run(run())
    assert streamed == whole
    after = _batch_sizes(url)
    rows, forwards = after[0] - before[0], after[1] - before[1]
    assert rows == 2 * len(prompts) and forwards < rows  # some forward decoded several rows, streamed ones too


def _batch_sizes(url: str) -> tuple[float, float]:
    lines = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines() if line[:1] != "#")
    return float(lines["loragen_completion_batch_size_sum"]), float(lines["loragen_completion_batch_size_count"])


# Tokens a long stream decodes: with its prompt, within the world's context of 128.
LONG = 120


def _long_prompt(base: BaseModel, lora) -> str:
    """A prompt the model continues for all of max_tokens=LONG (no end-of-sequence)."""
    for prompt in ("abcde", "hello", "aaaa", "xyz", "qwerty", "zzzz", "abab"):
        if base.completions([prompt], loras=[lora], max_new_tokens=LONG, raw=True)[0].finish_reason == "length":
            return prompt
    pytest.skip("every prompt ends early under this random model")


def test_a_client_that_disconnects_frees_the_engine(served, url: str, lora_id: str, base: BaseModel) -> None:
    app = served[1]
    prompt = _long_prompt(base, lora_of(url, lora_id))
    model = app.state.service.completions.base_model().model
    steps = threading.Semaphore(0)

    def slow_step(module, args) -> None:  # each decoding step takes 45 ms: LONG steps take over 5 s
        steps.release()
        time.sleep(0.045)

    hook = model.register_forward_pre_hook(slow_step)
    try:
        body = {"model": lora_id, "prompt": prompt, "max_tokens": LONG, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # The connection is closed after the first piece; the row ends at its next step.
        started = time.monotonic()
        with Client(url) as c:
            done = c.complete(prompt, lora_id=lora_id, max_tokens=2)
        waited = time.monotonic() - started
        assert done.usage is not None and done.usage["completion_tokens"] == 2
        assert waited < 2.5, waited  # not the 5 s that the abandoned stream would have taken
    finally:
        hook.remove()


def test_the_sdk_chats_and_streams_sync_and_async(url: str, lora_id: str, oa: openai.OpenAI) -> None:
    want = oa.chat.completions.create(model=lora_id, messages=USER, max_tokens=10, temperature=0)
    with Client(url) as c:
        answer = c.chat(USER, model=lora_id, max_tokens=10)
        assert isinstance(answer, ChatCompletion) and answer.choices[0].message.content == want.choices[0].message.content
        assert answer.usage.total_tokens == want.usage.total_tokens
        chunks = list(c.chat(USER, model=lora_id, max_tokens=10, stream=True, include_usage=True))
        assert all(isinstance(ch, ChatCompletionChunk) for ch in chunks)
        assert streamed_text(chunks) == {0: answer.choices[0].message.content}
        assert chunks[-1].usage == answer.usage
        described = c.chat(USER, description="english to french", max_tokens=10)
        assert described.lora_id == lora_id and described.choices[0].message.content == answer.choices[0].message.content

    async def run() -> tuple[ChatCompletion, list[ChatCompletionChunk]]:
        async with AsyncClient(url) as ac:
            whole = await ac.chat(USER, model=lora_id, max_tokens=10)
            return whole, [ch async for ch in await ac.chat(USER, model=lora_id, max_tokens=10, stream=True)]

    whole, chunks = asyncio.run(run())
    assert whole.choices[0].message.content == answer.choices[0].message.content
    assert streamed_text(chunks) == {0: answer.choices[0].message.content}
    with Client(url) as c:  # a raw completion streams too, its last chunk with the usage
        text = c.complete("abcde", lora_id=lora_id, max_tokens=10)
        pieces = list(c.complete("abcde", lora_id=lora_id, max_tokens=10, stream=True))
    assert isinstance(pieces[0], CompletionChunk) and streamed_text(pieces, "text") == {0: text.text}
    assert pieces[-1].usage is not None and pieces[-1].usage.model_dump() == text.usage
