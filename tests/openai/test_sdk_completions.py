"""The official `openai` SDK against the real stack: completions, chat, models and their parameters."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from dgtext.tokenizer import PromptTokenizer
from tests.integration.conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
SHORT = {"max_denoising_steps": 4}  # the tiny random model: few steps keep each job fast


def _model(stack: Stack) -> str:
    return stack.settings().model_name


def test_models_list_and_retrieve(client: openai.OpenAI, stack: Stack):
    name = _model(stack)
    assert [model.id for model in client.models.list()] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_completion_seeded_is_reproducible_and_seeds_differ(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    first = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12, seed=7, user="u-1",
                                      extra_body=SHORT)
    again = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12, seed=7, extra_body=SHORT)
    other = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12, seed=8, extra_body=SHORT)
    assert first.object == "text_completion" and first.model == model
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    assert first.choices[0].finish_reason in ("stop", "length")
    assert 0 < first.usage.completion_tokens <= 12 and first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_n_choices_are_jobs_with_consecutive_seeds(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    three = client.completions.create(model=model, prompt="import os", max_tokens=8, n=3, seed=20, extra_body=SHORT)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    for offset in (1, 2):  # choice k ran with seed + k
        alone = client.completions.create(model=model, prompt="import os", max_tokens=8, seed=20 + offset,
                                          extra_body=SHORT)
        assert three.choices[offset].text == alone.choices[0].text
    prompt_tokens = client.completions.create(model=model, prompt="import os", max_tokens=8, seed=20,
                                              extra_body=SHORT).usage.prompt_tokens
    assert three.usage.prompt_tokens == prompt_tokens  # a prompt counts once, whatever n


def test_prompt_lists_token_ids_and_echo(client: openai.OpenAI, stack: Stack):
    model, tokenizer = _model(stack), PromptTokenizer.from_dir(stack.model_dir)
    ids = tokenizer.encode_prompt("x = 1")  # bos + text: what the string prompt becomes
    by_text = client.completions.create(model=model, prompt="x = 1", max_tokens=8, seed=3, extra_body=SHORT)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, seed=3, extra_body=SHORT)
    assert by_ids.choices[0].text == by_text.choices[0].text
    mixed = client.completions.create(model=model, prompt=["x = 1", "y = 2"], max_tokens=8, n=2, seed=3,
                                      extra_body=SHORT)
    assert [c.index for c in mixed.choices] == [0, 1, 2, 3]
    assert mixed.choices[0].text == by_text.choices[0].text  # prompt 0, choice 0: same seed, same text
    id_lists = client.completions.create(model=model, prompt=[ids, ids], max_tokens=8, seed=3, extra_body=SHORT)
    assert [c.text for c in id_lists.choices] == [by_text.choices[0].text] * 2
    echoed = client.completions.create(model=model, prompt="x = 1", max_tokens=8, seed=3, echo=True,
                                       extra_body=SHORT)
    assert echoed.choices[0].text == "x = 1" + by_text.choices[0].text


def _stop_inside(text: str) -> str:
    """A stop string that occurs in `text` after its first characters (the text before it is non-empty)."""
    for start in range(2, len(text) - 1):
        candidate = text[start:start + 2]
        if candidate.strip() and text.find(candidate) == start:
            return candidate
    pytest.skip(f"the sampled text {text!r} has no usable stop string")


def test_stop_strings_cut_the_text_and_finish_with_stop(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    free = client.completions.create(model=model, prompt="class A:", max_tokens=32, seed=11, extra_body=SHORT)
    text = free.choices[0].text
    stop = _stop_inside(text)
    cut = client.completions.create(model=model, prompt="class A:", max_tokens=32, seed=11, stop=[stop, "\x00"],
                                    extra_body=SHORT)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    single = client.completions.create(model=model, prompt="class A:", max_tokens=32, seed=11, stop=stop,
                                       extra_body=SHORT)
    assert single.choices[0].text == cut.choices[0].text
    streamed = client.completions.create(model=model, prompt="class A:", max_tokens=32, seed=11, stop=[stop],
                                         stream=True, extra_body=SHORT)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stream_with_usage_matches_the_plain_answer(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=40, seed=5, extra_body=SHORT)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=40, seed=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body=SHORT)
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_stream_drafts_carry_each_step_in_the_extension_field(client: openai.OpenAI, stack: Stack):
    stream = client.completions.create(model=_model(stack), prompt="for i in", max_tokens=8, seed=2, stream=True,
                                       extra_body={"stream_drafts": True, "max_denoising_steps": 3})
    drafts = [chunk.model_extra["dgserve_draft"] for chunk in stream if "dgserve_draft" in (chunk.model_extra or {})]
    assert drafts and {"index", "canvas", "step", "text"} <= set(drafts[0])
    assert [d["step"] for d in drafts if d["canvas"] == 0][0] == 1


def test_chat_roles_and_text_parts(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]}]
    as_system = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, *history], max_tokens=8, seed=4,
        extra_body=SHORT)
    as_developer = client.chat.completions.create(
        model=model, messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *history],
        max_tokens=8, seed=4, extra_body=SHORT)
    assert as_system.object == "chat.completion" and as_system.choices[0].message.role == "assistant"
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_async_client_plain_and_streamed(async_client: openai.AsyncOpenAI, stack: Stack):
    model = _model(stack)

    async def run() -> tuple[str, str]:
        async with async_client:
            plain = await async_client.completions.create(model=model, prompt="while True:", max_tokens=8, seed=9,
                                                          extra_body=SHORT)
            stream = await async_client.completions.create(model=model, prompt="while True:", max_tokens=8,
                                                           seed=9, stream=True, extra_body=SHORT)
            text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
            return plain.choices[0].text, text

    plain, streamed = asyncio.run(run())
    assert plain == streamed


def test_openapi_lists_statuses_and_stream_content(stack: Stack):
    document = httpx.get(f"{stack.api_url}/openapi.json", timeout=10).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIErrorBody")
    assert "/v1/fim/completions" in document["paths"] and "/v1/batches/{batch_id}/cancel" in document["paths"]


def test_stream_n_choices_and_echo(client: openai.OpenAI, stack: Stack):
    model = _model(stack)
    plain = client.completions.create(model=model, prompt="print(", max_tokens=8, n=2, seed=30, echo=True,
                                      extra_body=SHORT)
    stream = client.completions.create(model=model, prompt="print(", max_tokens=8, n=2, seed=30, echo=True,
                                       stream=True, extra_body=SHORT)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: plain.choices[0].text, 1: plain.choices[1].text}
    assert texts[0].startswith("print(") and texts[1].startswith("print(")
