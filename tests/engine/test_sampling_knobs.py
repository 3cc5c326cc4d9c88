"""Per-request draw knobs (temperature, top_k, top_p) and committed-token logprobs: sampler maths and the
engine surface."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig, EngineRequest, SamplingParams, StepOutput, load_model
from engine.loader import LoadedModel
from engine.sampler import (
    CanvasState,
    SamplerInputs,
    denoise_step,
    scan_vocabulary,
    token_logprobs,
    truncated_draw,
)
from engine.types import MAX_LOGPROBS, MAX_TOP_K
from tests.engine.test_sampler import make_inputs, make_state

# B canvases, C canvas length, V vocab


def with_knobs(inputs: SamplerInputs, greedy: list[bool] | None = None, top_k: list[int] | None = None,
               top_p: list[float] | None = None) -> SamplerInputs:
    batch = inputs.temperature.shape[0]
    return dataclasses.replace(
        inputs,
        greedy=None if greedy is None else torch.tensor(greedy),
        top_k=torch.tensor(top_k if top_k is not None else [0] * batch),
        top_p=torch.tensor(top_p if top_p is not None else [1.0] * batch),
    )


def draws(z: torch.Tensor, inputs: SamplerInputs) -> torch.Tensor:
    """The draw of every position when every position is accepted (a huge entropy bound)."""
    inputs = dataclasses.replace(inputs, entropy_bound=torch.full_like(inputs.entropy_bound, 1e9))
    batch, length, vocab = z.shape
    return denoise_step(z.clone(), make_state(batch, length, vocab), inputs, vocab_chunk=16).next_canvas


def test_greedy_draw_is_the_argmax_whatever_the_seed() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 64, 50, generator=gen)  # flat enough that a sampled draw is rarely the argmax
    for seeds in ([1, 2], [3, 4]):
        greedy = with_knobs(make_inputs(2, seeds=seeds), greedy=[True, True])
        assert torch.equal(draws(z, greedy), z.argmax(-1))
    sampled = draws(z, make_inputs(2))
    assert not torch.equal(sampled, z.argmax(-1))  # the test can tell greedy from sampling


def test_top_k_of_one_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 40, 70, generator=gen)
    top1 = draws(z, with_knobs(make_inputs(3), top_k=[1, 1, 1]))
    greedy = draws(z, with_knobs(make_inputs(3), greedy=[True, True, True]))
    assert torch.equal(top1, greedy) and torch.equal(top1, z.argmax(-1))


def frequencies(z_row: torch.Tensor, positions: int, **knobs: list) -> torch.Tensor:
    """Empirical distribution of the draw over many positions (each position is a fresh uniform)."""
    vocab = z_row.shape[0]
    z = z_row.expand(1, positions, vocab).contiguous()
    inputs = with_knobs(make_inputs(1, seeds=[9]), **knobs)
    result = scan_vocabulary(z, inputs.sample_keys, 3, temperature=inputs.temperature)
    assert inputs.top_k is not None and inputs.top_p is not None
    drawn = truncated_draw(z, result, inputs.top_k, inputs.top_p)
    return torch.bincount(drawn.flatten(), minlength=vocab).double() / positions


def test_top_p_cuts_the_tail_of_a_hand_built_distribution() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)
    z_row = probs.log()
    # top_p 0.7: 0.5 < 0.7 so id 3 joins (mass before it 0.5), id 2's mass before is 0.8 >= 0.7: cut
    freq = frequencies(z_row, 40_000, top_p=[0.7])
    assert freq[0] == 0 and freq[2] == 0
    assert abs(float(freq[1]) - 0.5 / 0.8) < 0.01 and abs(float(freq[3]) - 0.3 / 0.8) < 0.01
    # top_p 0.4: the most likely id alone
    assert frequencies(z_row, 2_000, top_p=[0.4])[1] == 1.0
    # top_k 3 renormalises over 0.95; top_p then applies to that mass: 0.6 * 0.95 = 0.57 > 0.5 keeps id 3 too
    freq = frequencies(z_row, 40_000, top_k=[3], top_p=[0.6])
    assert freq[0] == 0 and freq[2] == 0 and abs(float(freq[1]) - 0.5 / 0.8) < 0.01
    freq = frequencies(z_row, 40_000, top_k=[3])
    assert freq[0] == 0 and abs(float(freq[2]) - 0.15 / 0.95) < 0.01
    # off (top_k 0, top_p 1): the full distribution, tail included
    freq = frequencies(z_row, 40_000)
    assert abs(float(freq[0]) - 0.05) < 0.01


def test_knobs_mixed_in_a_batch_give_each_canvas_what_it_gets_alone() -> None:
    batch, length, vocab = 5, 24, 60
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(batch, length, vocab, generator=gen) * 2
    state = make_state(batch, length, vocab)
    knobs = {"greedy": [True, False, False, False, False], "top_k": [0, 3, 0, 5, 0],
             "top_p": [1.0, 1.0, 0.6, 0.9, 1.0]}
    inputs = with_knobs(make_inputs(batch, seeds=[11, 22, 33, 44, 55], bound=0.8), **knobs)
    inputs = dataclasses.replace(inputs, temperature=torch.tensor([1.0, 0.5, 0.7, 1.3, 0.9]))
    together = denoise_step(z.clone(), state, inputs, vocab_chunk=16, logprobs_top=4)
    for b in range(batch):
        def one(t: torch.Tensor, b: int = b) -> torch.Tensor:
            return t[b:b + 1]
        alone = denoise_step(
            z[b:b + 1].clone(),
            CanvasState(*(one(t) for t in (state.canvas_ids, state.prev_argmax, state.stable_steps,
                                           state.is_fixed, state.fixed_ids))),
            SamplerInputs(**{name: None if t is None else one(t) for name, t in inputs.__dict__.items()}),
            vocab_chunk=16, logprobs_top=4)
        assert torch.equal(alone.next_canvas[0], together.next_canvas[b]), f"canvas {b}"
        assert torch.equal(alone.argmax[0], together.argmax[b])
        assert alone.logprobs is not None and together.logprobs is not None
        assert torch.equal(alone.logprobs.selected[0], together.logprobs.selected[b])


def test_logprobs_are_log_softmax_of_the_final_logits_at_the_committed_ids() -> None:
    batch, length, vocab = 2, 10, 300
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(batch, length, vocab, generator=gen) * 4
    is_fixed = torch.zeros(batch, length, dtype=torch.bool)
    is_fixed[:, 3] = True
    fixed_ids = torch.full((batch, length), 7)
    state = make_state(batch, length, vocab, is_fixed=is_fixed, fixed_ids=fixed_ids)
    out = denoise_step(logits.clone(), state, make_inputs(batch, temperature=0.6), vocab_chunk=64, logprobs_top=5)
    assert out.logprobs is not None
    expected = torch.log_softmax(logits, dim=-1)  # temperature 1, whatever the step's temperature
    committed = torch.where(is_fixed, fixed_ids, logits.argmax(-1))
    assert torch.equal(out.argmax, committed)
    torch.testing.assert_close(out.logprobs.selected, expected.gather(-1, committed.unsqueeze(-1)).squeeze(-1),
                               rtol=0, atol=1e-5)
    top_values, top_ids = expected.topk(5, dim=-1)
    assert torch.equal(out.logprobs.top_ids, top_ids)
    torch.testing.assert_close(out.logprobs.top_logprobs, top_values, rtol=0, atol=1e-5)
    # n = 0 still yields the committed token's logprob (top of width 1, which callers cut to 0)
    zero = token_logprobs(logits, logits.amax(-1), committed, 0, 64)
    torch.testing.assert_close(zero.selected, out.logprobs.selected)


# ----- the engine surface -----

STEPS = 4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_checkpoint)


def run(engine: Engine, requests: dict[str, EngineRequest], max_steps: int = 300) -> list[StepOutput]:
    for request_id, request in requests.items():
        engine.add_request(request, request_id)
    outputs: list[StepOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs += engine.step()
    raise AssertionError("engine still busy")


def canvases(outputs: list[StepOutput], request_id: str) -> list[StepOutput]:
    return [o for o in outputs if o.request_id == request_id and o.kind == "canvas"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, "temperature"), ("temperature", math.inf, "temperature"),
    ("top_k", -1, "top_k"), ("top_k", MAX_TOP_K + 1, "top_k"), ("top_k", 2.5, "top_k"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_p", math.nan, "top_p"),
    ("logprobs", -1, "logprobs"), ("logprobs", MAX_LOGPROBS + 1, "logprobs"), ("logprobs", True, "logprobs"),
])
def test_bad_knobs_are_refused_naming_the_field(loaded: LoadedModel, field: str, value: object,
                                                message: str) -> None:
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256))
    with pytest.raises(ValueError, match=message):
        engine.add_request(EngineRequest(prompt="x", params=SamplingParams(**{field: value})))
    assert not engine.has_unfinished()  # nothing was queued


def test_engine_mixes_knobs_in_one_batch_and_returns_logprobs(loaded: LoadedModel) -> None:
    base = {"max_new_tokens": 40, "max_denoising_steps": STEPS, "fixed_steps": True}
    requests = {
        "greedy": EngineRequest(prompt="abc", params=SamplingParams(temperature=0.0, logprobs=3, **base)),
        "nucleus": EngineRequest(prompt="abc", params=SamplingParams(seed=5, top_p=0.5, top_k=8, logprobs=0,
                                                                     **base)),
        "plain": EngineRequest(prompt="abc", params=SamplingParams(seed=5, temperature=1.5, **base)),
    }
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=4, max_context=256))
    outputs = run(engine, requests)
    for request_id, width in (("greedy", 3), ("nucleus", 0)):
        for out in canvases(outputs, request_id):
            assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) > 0
            for token, entry in zip(out.token_ids, out.logprobs, strict=True):
                assert entry.token_id == token and entry.logprob <= 0 and len(entry.top) == width
                if width:  # the committed id of a free position is the argmax: the best alternative
                    assert entry.top[0][0] == token and entry.top[0][1] == pytest.approx(entry.logprob, abs=1e-6)
                    assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    assert all(out.logprobs is None for out in canvases(outputs, "plain"))
    # greedy without a seed is reproducible: alone, in another engine, it gives the same tokens
    again = run(Engine(loaded, EngineConfig(max_canvases_in_flight=4, max_context=256)),
                {"greedy": requests["greedy"]})
    assert [o.token_ids for o in canvases(again, "greedy")] == [o.token_ids for o in canvases(outputs, "greedy")]
