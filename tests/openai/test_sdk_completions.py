"""The official `openai` SDK against the real stack: completions, chat, models and their parameters."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
SHORT = {"max_denoising_steps": 4}  # the tiny random model: few steps keep each job fast


def test_models_list_and_retrieve(client: openai.OpenAI, stack: Stack):
    name = stack.settings().model_name
    assert [model.id for model in client.models.list()] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_completion_plain_and_seeded_reproducible(client: openai.OpenAI, stack: Stack):
    model = stack.settings().model_name
    first = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, seed=7,
                                      temperature=0.7, top_p=0.9, user="u-1", extra_body=SHORT)
    again = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, seed=7,
                                      temperature=0.7, top_p=0.9, extra_body=SHORT)
    assert first.object == "text_completion" and first.choices[0].text == again.choices[0].text
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 8 and first.usage.prompt_tokens > 0
