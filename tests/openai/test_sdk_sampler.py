"""Per-request sampler knobs through the official SDK against the real stack: temperature, top_p, top_k and
logprobs reach the engine's sampler (issue 14's `SamplingParams`), for completions and chat."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
SHORT = {"max_denoising_steps": 4}


def _text(client: openai.OpenAI, stack: Stack, seed: int | None, **params: object) -> str:
    extra = {**SHORT, **params.pop("extra_body", {})}  # type: ignore[dict-item]
    answer = client.completions.create(model=stack.settings().model_name, prompt="def f(x):", max_tokens=16,
                                       seed=seed, extra_body=extra, **params)  # type: ignore[arg-type]
    return answer.choices[0].text


def test_temperature_top_k_and_top_p_reach_the_sampler(client: openai.OpenAI, stack: Stack):
    # The canvas starts from seeded noise, so even greedy draws depend on the seed; an unseeded greedy request
    # runs with seed 0 and is reproducible, an unseeded sampled one is not.
    assert _text(client, stack, None, temperature=0) == _text(client, stack, None, temperature=0)
    assert _text(client, stack, None) != _text(client, stack, None)
    sampled = _text(client, stack, 1)
    top_one = _text(client, stack, 1, extra_body={"top_k": 1})
    assert top_one != sampled  # restricted to the likeliest id at every draw
    assert _text(client, stack, 1, top_p=1e-6) == top_one  # a tiny nucleus is the likeliest id too
    warm = _text(client, stack, 1, temperature=1.5)
    assert warm == _text(client, stack, 1, temperature=1.5) != sampled  # seeded and reproducible; it scales


def test_completion_logprobs(client: openai.OpenAI, stack: Stack):
    answer = client.completions.create(model=stack.settings().model_name, prompt="import", max_tokens=12, seed=6,
                                       logprobs=3, extra_body=SHORT)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == answer.usage.completion_tokens  # one entry per committed token
    if "\ufffd" not in "".join(logprobs.tokens):  # a byte of a split character decodes alone as U+FFFD
        assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) > 0
    assert all(value <= 0 for value in logprobs.token_logprobs)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= max(top.values()) + 1e-5
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client: openai.OpenAI, stack: Stack):
    answer = client.chat.completions.create(model=stack.settings().model_name, seed=6, max_tokens=12,
                                            messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                            top_logprobs=2, extra_body=SHORT)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
    assert content[0].bytes == list(content[0].token.encode())
