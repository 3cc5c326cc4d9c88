"""Engine loop on the tiny preset (CPU): batching, joining, abort, stops, canvases, long prompts, infill."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig, EngineRequest, InfillCanvas, SamplingParams, StepOutput, load_model
from engine.loader import LoadedModel
from engine.model.transformer import DiffusionGemmaModel

# B canvases, C canvas length, V vocab

STEPS = 5  # denoising steps per canvas: random weights never converge, so every canvas runs them all


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_checkpoint)


def make_engine(loaded: LoadedModel, **options) -> Engine:
    config = {"max_canvases_in_flight": 4, "max_context": 512, **options}
    return Engine(loaded, EngineConfig(**config))


def params(seed: int | None, **overrides) -> SamplingParams:
    return SamplingParams(**{"seed": seed, "max_new_tokens": 32, "max_denoising_steps": STEPS, **overrides})


def run_to_end(engine: Engine, max_steps: int = 500) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs += engine.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")


def committed(outputs: list[StepOutput], request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id and o.kind == "canvas" for t in o.token_ids]


def finished(outputs: list[StepOutput], request_id: str) -> StepOutput:
    (out,) = [o for o in outputs if o.request_id == request_id and o.kind == "finished"]
    return out


class BiasedLogitsModel(DiffusionGemmaModel):
    """The real model with a fixed additive bias on its decoder logits: `forced` pins an id at chosen absolute
    positions, `suppressed` ids are pushed down everywhere else (crafted logits, as the tests need)."""

    def __init__(self, base: DiffusionGemmaModel, forced: dict[int, int], suppressed: tuple[int, ...] = (),
                 everywhere: int | None = None) -> None:
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.eval().requires_grad_(False)
        self.forced, self.suppressed, self.everywhere = forced, suppressed, everywhere

    def denoise(self, canvas_ids, positions, *args, **kwargs):  # type: ignore[override]
        logits = super().denoise(canvas_ids, positions, *args, **kwargs)  # [B, C, V]
        logits[..., list(self.suppressed)] -= 100.0
        if self.everywhere is not None:
            logits[..., self.everywhere] += 1000.0
        for position, token in self.forced.items():
            logits[..., token] += 1000.0 * (positions == position)
        return logits


def with_model(loaded: LoadedModel, model: DiffusionGemmaModel) -> LoadedModel:
    return dataclasses.replace(loaded, model=model)


def test_seeded_request_gives_the_same_tokens_alone_and_batched(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    request = EngineRequest(prompt="the same seed", params=params(1234, max_new_tokens=64))
    alone_id = engine.add_request(request)
    alone = committed(run_to_end(engine), alone_id)
    others = [EngineRequest(prompt="a much longer neighbour prompt " * 3, params=params(7, max_new_tokens=64)),
              EngineRequest(prompt_token_ids=(2, 40, 41), params=params(None)),
              EngineRequest(messages=[{"role": "user", "content": "hi"}], params=params(9, max_new_tokens=96))]
    ids = [engine.add_request(others[0]), engine.add_request(request), engine.add_request(others[1]),
           engine.add_request(others[2])]
    outputs = run_to_end(engine)
    assert len(alone) == 64 or finished(outputs, ids[1]).finish_reason == "stop"
    assert committed(outputs, ids[1]) == alone
    assert all(finished(outputs, i).finish_reason in ("stop", "length") for i in ids)


def test_request_added_mid_canvas_joins_at_the_next_step(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    early = engine.add_request(EngineRequest(prompt="first", params=params(1, max_new_tokens=64)))
    outputs = engine.step() + engine.step()
    assert engine.last_step_stats.num_denoising_canvases == 1
    late = engine.add_request(EngineRequest(prompt="second", params=params(2)))
    outputs += engine.step()
    assert engine.last_step_stats.num_denoising_canvases == 2  # both canvases in one decoder forward
    assert engine.last_step_stats.num_prefill_requests == 1
    outputs += run_to_end(engine)
    solo = make_engine(loaded)
    early_solo = solo.add_request(EngineRequest(prompt="first", params=params(1, max_new_tokens=64)))
    late_solo = solo.add_request(EngineRequest(prompt="second", params=params(2)))
    solo_outputs = run_to_end(solo)
    assert committed(outputs, early) == committed(solo_outputs, early_solo)
    assert committed(outputs, late) == committed(solo_outputs, late_solo)


def test_abort_frees_the_slot_and_reports_aborted(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, max_canvases_in_flight=1)
    victim = engine.add_request(EngineRequest(prompt="abort me", params=params(1, max_new_tokens=96)))
    queued = engine.add_request(EngineRequest(prompt="wait", params=params(2)))
    engine.step()
    assert engine.num_running() == 1 and engine.num_waiting() == 1
    engine.abort(victim)
    engine.abort("no-such-request")  # unknown ids are ignored
    outputs = engine.step()
    end = finished(outputs, victim)
    assert end.finish_reason == "aborted" and end.stats is not None and end.stats.denoising_steps == 1
    assert engine.last_step_stats.num_denoising_canvases == 1  # the waiting request took the freed slot
    outputs += run_to_end(engine)
    assert finished(outputs, queued).finish_reason in ("stop", "length")
    assert not engine.has_unfinished() and engine.num_running() == 0


@pytest.mark.parametrize("canvas, offset", [(0, 10), (1, 5)])
def test_stop_token_mid_canvas_ends_the_request_and_drops_what_follows(loaded: LoadedModel, canvas: int,
                                                                       offset: int) -> None:
    prompt = (2, 50, 51, 52)
    length, stop = loaded.config.canvas_length, loaded.generation_defaults.stop_token_ids[-1]
    first_stop = len(prompt) + canvas * length + offset
    model = BiasedLogitsModel(loaded.model, forced={first_stop: stop, first_stop + 3: stop},
                              suppressed=loaded.generation_defaults.stop_token_ids)
    engine = make_engine(with_model(loaded, model))
    rid = engine.add_request(EngineRequest(prompt_token_ids=prompt, params=params(3, max_new_tokens=4 * length)))
    outputs = run_to_end(engine)
    tokens = committed(outputs, rid)
    assert len(tokens) == canvas * length + offset + 1 and tokens[-1] == stop
    assert stop not in tokens[:-1]
    end = finished(outputs, rid)
    assert end.finish_reason == "stop" and end.stats.canvases == canvas + 1
    assert end.stats.generated_tokens == len(tokens)


def test_several_canvases_up_to_max_new_tokens(loaded: LoadedModel) -> None:
    model = BiasedLogitsModel(loaded.model, forced={}, suppressed=loaded.generation_defaults.stop_token_ids)
    engine = make_engine(with_model(loaded, model))
    length = loaded.config.canvas_length
    rid = engine.add_request(EngineRequest(prompt="count", params=params(4, max_new_tokens=2 * length + 6)))
    outputs = run_to_end(engine)
    canvases = [o for o in outputs if o.kind == "canvas"]
    assert [len(o.token_ids) for o in canvases] == [length, length, 6]
    assert [o.canvas_index for o in canvases] == [0, 1, 2]
    end = finished(outputs, rid)
    assert end.finish_reason == "length"
    assert (end.stats.canvases, end.stats.generated_tokens, end.stats.denoising_steps) == (3, 2 * length + 6,
                                                                                           3 * STEPS)


def test_confident_canvases_stop_early_unless_fixed_steps(loaded: LoadedModel) -> None:
    model = BiasedLogitsModel(loaded.model, forced={}, everywhere=300)
    engine = make_engine(with_model(loaded, model))
    adaptive = engine.add_request(EngineRequest(prompt="x", params=params(5, max_denoising_steps=20)))
    fixed = engine.add_request(EngineRequest(prompt="x", params=params(5, max_denoising_steps=20,
                                                                         fixed_steps=True)))
    outputs = run_to_end(engine)
    # step 1 has no previous argmax; step 2 repeats it with ~zero entropy: stable (threshold 1) and confident
    assert finished(outputs, adaptive).stats.denoising_steps == 2
    assert finished(outputs, fixed).stats.denoising_steps == 20
    assert committed(outputs, adaptive) == [300] * loaded.config.canvas_length


def test_prompt_longer_than_the_window_chunked_or_not_gives_the_same_tokens(loaded: LoadedModel) -> None:
    window = loaded.config.sliding_window
    prompt = tuple(range(3, 3 + 6 * window + 5))
    results = []
    for budget in (4096, window + 3):
        engine = make_engine(loaded, max_tokens_per_forward=budget)
        rid = engine.add_request(EngineRequest(prompt_token_ids=prompt, params=params(6, max_new_tokens=64)))
        outputs = run_to_end(engine)
        results.append(committed(outputs, rid))
        assert finished(outputs, rid).stats.prompt_tokens == len(prompt)
    assert results[0] == results[1] and results[0]


def test_drafts_are_streamed_only_when_asked(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    drafty = engine.add_request(EngineRequest(prompt="d", params=params(1, stream_drafts=True)))
    quiet = engine.add_request(EngineRequest(prompt="q", params=params(2)))
    outputs = run_to_end(engine)
    drafts = [o for o in outputs if o.kind == "draft"]
    assert [o.step for o in drafts] == list(range(1, STEPS + 1))
    assert {o.request_id for o in drafts} == {drafty}
    assert list(drafts[-1].token_ids) == committed(outputs, drafty)[:len(drafts[-1].token_ids)]
    assert not [o for o in outputs if o.request_id == quiet and o.kind == "draft"]


def test_infill_positions_come_back_unchanged(loaded: LoadedModel) -> None:
    length = loaded.config.canvas_length
    fixed_mask = tuple(i % 4 != 1 for i in range(length))
    first = InfillCanvas(leading_token_ids=(60, 61), token_ids=tuple(100 + i for i in range(length)),
                         is_fixed=fixed_mask)
    second = InfillCanvas(leading_token_ids=(), token_ids=(1,) * length, is_fixed=(True,) * 4 + (False,) * (length - 4))
    engine = make_engine(loaded)
    rid = engine.add_request(EngineRequest(prompt_token_ids=(2, 9), params=params(8), infill=(first, second)))
    outputs = run_to_end(engine)
    canvases = [o.token_ids for o in outputs if o.request_id == rid and o.kind == "canvas"]
    assert len(canvases) == 2 and all(len(c) == length for c in canvases)
    for canvas, spec in zip(canvases, (first, second), strict=True):
        assert all(got == want for got, want, fixed in zip(canvas, spec.token_ids, spec.is_fixed, strict=True)
                   if fixed)
    assert finished(outputs, rid).finish_reason == "stop"


@pytest.mark.parametrize("request_kwargs, message", [
    ({"prompt_token_ids": tuple(range(3, 500))}, "leave room for no canvas"),
    ({"prompt": "x", "params": SamplingParams(max_new_tokens=10_000)}, "^max_new_tokens: .* over the 256"),
    ({"prompt": "x", "prompt_token_ids": (3,)}, "exactly one of"),
    ({}, "exactly one of"),
    ({"prompt_token_ids": ()}, "empty"),
    ({"prompt_token_ids": (3, 10**6)}, r"\[0, 512\)"),
    ({"prompt": "x", "params": SamplingParams(t_min=0.9, t_max=0.5)}, "t_max: t_max 0.5 is below t_min 0.9"),
    ({"prompt": "x", "params": SamplingParams(max_denoising_steps=0)}, "max_denoising_steps"),
    ({"prompt": "x", "params": SamplingParams(entropy_bound=0.0)}, "entropy_bound"),
    ({"prompt": "x", "params": SamplingParams(stability_threshold=-1)}, "stability_threshold"),
    ({"prompt": "x", "params": SamplingParams(seed=1.5)}, "seed"),
    ({"prompt": "x", "infill": ()}, "at least one canvas"),
    ({"prompt": "x", "infill": (InfillCanvas((), (3,) * 5, (True,) * 5),)}, "canvas_length=32"),
])
def test_invalid_requests_raise_value_error_at_add_request(loaded: LoadedModel, request_kwargs: dict,
                                                          message: str) -> None:
    engine = make_engine(loaded, max_context=256)
    with pytest.raises(ValueError, match=message):
        engine.add_request(EngineRequest(**request_kwargs))
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_rejected(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    engine.add_request(EngineRequest(prompt="a", params=params(1)), request_id="job-1")
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request(EngineRequest(prompt="b", params=params(1)), request_id="job-1")


def test_kv_budget_too_small_is_an_actionable_error(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="raise kv_cache_bytes or lower max_context"):
        make_engine(loaded, kv_cache_bytes=1024)


def test_step_stats_and_request_stats_are_filled(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    rid = engine.add_request(EngineRequest(prompt="stats", params=params(1)))
    outputs = engine.step()
    stats = engine.last_step_stats
    assert stats.num_encoder_tokens > 0 and stats.num_denoising_canvases == 1 and stats.forward_seconds > 0
    outputs += run_to_end(engine)
    end = finished(outputs, rid).stats
    assert end.prompt_tokens == stats.num_encoder_tokens and end.steps_per_canvas == STEPS
    assert end.queue_seconds >= 0 and end.run_seconds >= end.prefill_seconds >= 0
    runner = engine.runner  # the runner's per-slot state stays allocated between requests
    assert runner.sc_embeds.shape == (runner.num_slots, loaded.config.canvas_length, loaded.config.hidden_size)


def test_a_step_reads_the_device_at_most_once(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count host reads of tensors the step computed. Tensors built from Python values (torch.tensor, and their
    .to() copies) and the results of .cpu() are host data already: reading those is not a device read."""
    engine = make_engine(loaded)
    for seed in range(3):
        engine.add_request(EngineRequest(prompt=f"read {seed}", params=params(seed, stream_drafts=True)))
    reads: list[str] = []

    def marking(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if original is not torch.Tensor.to or getattr(source, "_host_data", False):
                result._host_data = True  # an attribute on the tensor itself: ids get reused, tensors don't
            return result
        return wrapper

    def counting(original, name):
        def wrapper(self, *args, **kwargs):
            if not getattr(self, "_host_data", False):
                reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "tensor", marking(torch.tensor))
    monkeypatch.setattr(torch.Tensor, "to", marking(torch.Tensor.to))
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), name))
    monkeypatch.setattr(torch.Tensor, "cpu", marking(counting(torch.Tensor.cpu, "cpu")))
    for _ in range(STEPS + 1):  # prefill + first step, later steps, a canvas stop
        reads.clear()
        engine.step()
        assert len(reads) <= 1, reads


def test_bfloat16_engine_runs_on_cpu(tiny_checkpoint: Path) -> None:
    loaded_bf16 = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    engine = make_engine(loaded_bf16)
    rid = engine.add_request(EngineRequest(prompt="bf16", params=params(1)))
    outputs = run_to_end(engine)
    tokens = committed(outputs, rid)
    assert tokens and all(0 <= t < loaded_bf16.config.vocab_size for t in tokens)
    assert engine.runner.sc_embeds.dtype == torch.bfloat16


class FailsOnceModel(DiffusionGemmaModel):
    """The real model, except that its first decoder forward raises as a device error would."""

    def __init__(self, base: DiffusionGemmaModel) -> None:
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.eval().requires_grad_(False)
        self.failed = False

    def denoise(self, *args, **kwargs):  # type: ignore[override]
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().denoise(*args, **kwargs)


def test_a_device_error_fails_that_step_and_the_engine_goes_on(loaded: LoadedModel) -> None:
    engine = make_engine(with_model(loaded, FailsOnceModel(loaded.model)))
    doomed = engine.add_request(EngineRequest(prompt="doomed", params=params(1)))
    outputs = engine.step()
    end = finished(outputs, doomed)
    assert end.finish_reason == "error" and "out of memory" in end.text
    survivor = engine.add_request(EngineRequest(prompt="after", params=params(2)))
    outputs = run_to_end(engine)
    assert finished(outputs, survivor).finish_reason in ("stop", "length") and committed(outputs, survivor)
    assert engine.scheduler.free_slots and not engine.has_unfinished()
