"""Pure pieces of the OpenAI surface: stop strings, streamed stop cutting, error translation, request plans."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dgtext.stops import cut_at_stop, first_stop, ids_within, safe_prefix_length
from services.openai.errors import translate_error
from services.openai.schemas import ChatCompletionCreate, CompletionCreate, FimCreate
from services.openai.shapes import ChoiceStream
from services.openai.translate import plan_chat, plan_completion, plan_fim


def test_stop_strings_cut_at_the_earliest():
    assert first_stop("abc\ndef END", ["END", "\n"]) == 3
    assert cut_at_stop("abc\ndef", ["\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False) and cut_at_stop("abc", None) == ("abc", False)


def test_ids_within_keeps_the_tokens_of_the_cut_text():
    pieces = {1: "ab", 2: "c\n", 3: "de"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    assert ids_within([1, 2, 3], 3, decode) == [1]  # "abc" is cut inside token 2: only "ab" is whole
    assert ids_within([1, 2, 3], 4, decode) == [1, 2] and ids_within([1, 2, 3], 0, decode) == []


def test_safe_prefix_holds_back_a_possible_stop():
    assert safe_prefix_length("hello EN", ["END"]) == 6
    assert safe_prefix_length("hello", ["END"]) == 5


def test_choice_stream_cuts_across_canvases():
    stream = ChoiceStream(["STOP"])
    assert stream.add_canvas("abc ST") == "abc "
    assert stream.add_canvas("OP tail") == ""  # the stop string completed: nothing after it
    assert stream.stopped and stream.finish("abc ") == ""
    plain = ChoiceStream([])
    assert plain.add_canvas("x") == "x" and plain.finish("xyz") == "yz"


def test_translate_error_maps_fields_and_statuses():
    status, body = translate_error(422, {"error": {"code": "invalid_request", "field": "max_new_tokens",
                                                   "message": "max_new_tokens: 9 is above the limit"}})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "max_tokens" in body["error"]["message"]
    status, body = translate_error(429, {"error": {"code": "queue_full", "message": "full"}})
    assert status == 429 and body["error"] == {"message": "full", "type": "rate_limit_error", "param": None,
                                               "code": "queue_full"}
    assert translate_error(503, "down")[1]["error"]["type"] == "service_unavailable_error"


def test_plans_one_job_per_choice():
    plan = plan_completion(CompletionCreate(prompt=["a", "b"], n=2, seed=10, stop="x"), decode=str)
    seeds = [choice.job.seed for choice in plan.choices]
    assert seeds == [10, 11, 10, 11] and [c.counts_prompt for c in plan.choices] == [True, False, True, False]
    assert all(choice.job.stop == ["x"] for choice in plan.choices)
    chat = plan_chat(ChatCompletionCreate(messages=[{"role": "developer", "content": [{"type": "text", "text": "s"}]},
                                                    {"role": "user", "content": "u"}], logprobs=True, top_logprobs=3))
    job = chat.choices[0].job
    assert [m.role for m in job.messages] == ["system", "user"] and job.logprobs == 3
    fim = plan_fim(FimCreate(prompt="ab", suffix="cd", max_tokens=4))
    edit = fim.choices[0].job
    assert edit.kind == "edit" and edit.document == "abcd" and (edit.edits[0].start, edit.edits[0].end) == (2, 2)


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "presence_penalty": 0.1}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
])
def test_refused_completion_fields(body, field):
    with pytest.raises(ValidationError) as caught:
        CompletionCreate.model_validate(body)
    assert field in str(caught.value)


def test_zero_penalties_and_empty_bias_are_accepted():
    body = CompletionCreate(prompt="x", presence_penalty=0, frequency_penalty=0.0, logit_bias={})
    assert body.presence_penalty == 0
