"""The decoder step compiled whole (torch.compile fullgraph=True, engine/compiled_step.py) gives the eager
step's tokens, at two batch buckets, with padding rows and padded block tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig, EngineRequest, SamplingParams, StepOutput, load_model
from engine.compiled_step import EncodeRegion, StepRegion, bucket, compile_options, skip_parameter_guards
from engine.loader import LoadedModel

STEPS = 3


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_checkpoint)


def generate(engine: Engine, count: int, new_tokens: int = 32) -> list[list[tuple[int, ...]]]:
    """Committed canvases of `count` requests run together (knobs mixed in: one nucleus, one greedy)."""
    knobs = [{}, {"top_p": 0.9, "top_k": 20}, {"temperature": 0.0}]
    ids = [engine.add_request(EngineRequest(prompt=f"request {i}", params=SamplingParams(
        seed=i, max_new_tokens=new_tokens, max_denoising_steps=STEPS, fixed_steps=True, **knobs[i % 3])))
        for i in range(count)]
    outputs: list[StepOutput] = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        outputs += engine.step()
    assert not engine.has_unfinished()
    return [[o.token_ids for o in outputs if o.request_id == rid and o.kind == "canvas"] for rid in ids]


def test_buckets_are_powers_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]


def test_compile_step_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="compile_step"):
        EngineConfig(compile_step="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_fullgraph_step_gives_the_eager_tokens_at_two_buckets(loaded: LoadedModel) -> None:
    """fullgraph=True fails on any graph break (what would break a CUDA graph). The backend is aot_eager: the
    same trace, functionalisation and graph as inductor's input, without C++ code generation (minutes on the
    shared 2-core CPU). fp32, token for token, including batches with padding rows: 3 requests in bucket 4
    first (buffers fresh: before the fix the zeroed padding row had temperature 0 and top_k 0, and its
    nucleus draw indexed -1), then again after bucket 4 ran full (the padding row now holds a stale row)."""
    config = EngineConfig(max_canvases_in_flight=4, max_context=256, compile_step=False)
    compiled = Engine(loaded, config)
    runner = compiled.runner
    runner.step_region = StepRegion(runner.model, runner.cache, True, config.vocab_chunk_size, backend="aot_eager")
    for count in (3, 1, 4, 3):  # buckets 4 (one padding row), 1, 4 (full), 4 (a stale padding row)
        want = generate(Engine(loaded, config), count)
        got = generate(compiled, count)
        assert got == want and all(len(canvases) == 1 for canvases in got)
    assert {key[0] for key in runner.step_region._buffers} == {1, 4}  # a graph and buffers per bucket
    assert len(runner.step_region._buffers) == 2  # 3 and 4 requests share bucket 4's buffers and graph


@pytest.mark.slow
def test_compiled_fullgraph_encoder_writes_the_eager_kv_at_two_token_buckets(loaded: LoadedModel) -> None:
    """Encoder passes (prefill chunks, commits) compiled whole (aot_eager, fullgraph=True) at two token buckets
    with padding tokens and a padding row write the same K/V as the eager passes (the pools outside the scratch
    block, which only padding writes; see below for the rounding), and the same tokens are decoded from them."""
    config = EngineConfig(max_canvases_in_flight=4, max_context=256, compile_step=False)
    eager, compiled = Engine(loaded, config), Engine(loaded, config)
    runner = compiled.runner
    runner.encode_region = EncodeRegion(runner.model, runner.cache, True, backend="aot_eager")
    # 3 rows (bucket 4, one padding row): the prompts' prefill (16 tokens) and the first canvas's commit (32)
    got = generate(compiled, 3, new_tokens=64)
    assert got == generate(eager, 3, new_tokens=64) and all(len(canvases) == 2 for canvases in got)
    buckets = set(runner.encode_region._buffers)
    assert {tokens for _, tokens, _, _ in buckets} == {16, 32} and {rows for rows, _, _, _ in buckets} == {4}
    cache, reference = runner.cache, eager.runner.cache
    for layer, kind in enumerate(loaded.config.layer_types):
        visible = cache.scratch[kind] * cache.block_size  # storage rows before the scratch block
        for got_pool, want_pool in ((cache.keys[layer], reference.keys[layer]),
                                    (cache.values[layer], reference.values[layer])):
            got_kv, want_kv = got_pool[:visible], want_pool[:visible]
            # Layer 0's K/V come from the embeddings alone: bit for bit. Deeper layers' follow an attention over
            # the padded table's whole width (masked keys weigh exactly 0, but the fp32 sums are blocked
            # differently over a longer key axis): equal to fp32 rounding.
            if layer == 0:
                assert torch.equal(got_kv, want_kv)
            error = float((got_kv - want_kv).abs().max() / want_kv.abs().max())
            assert error < 1e-5 and bool((want_kv != 0).any()), (layer, error)


@pytest.mark.slow
def test_inductor_compiled_encoder_writes_the_eager_kv(loaded: LoadedModel) -> None:
    """One prefill through the encoder pass compiled by inductor (the CPU code generation, not aot_eager) writes
    the eager pass's K/V to fp32 rounding. Before layer.py copied k and v out of the nested layer region, every
    layer's cache rows differed (relative error ~1.5, some entries 1e37: a wrong layout read back)."""
    config = EngineConfig(max_canvases_in_flight=1, max_context=256, compile_step=False)
    eager, compiled = Engine(loaded, config), Engine(loaded, config)
    runner = compiled.runner
    runner.encode_region = EncodeRegion(runner.model, runner.cache, True, backend="inductor")
    for engine in (eager, compiled):
        engine.add_request(EngineRequest(prompt="a prompt of a few words", params=SamplingParams(
            seed=3, max_new_tokens=32, max_denoising_steps=1, fixed_steps=True)))
        engine.step()  # the prefill (and the first canvas's step, eager: compile_step is off)
    assert runner.encode_region._buffers  # the compiled pass ran
    cache, reference = runner.cache, eager.runner.cache
    for layer, kind in enumerate(loaded.config.layer_types):
        visible = cache.scratch[kind] * cache.block_size
        for got_pool, want_pool in ((cache.keys[layer], reference.keys[layer]),
                                    (cache.values[layer], reference.values[layer])):
            want_kv = want_pool[:visible]
            error = float((got_pool[:visible] - want_kv).abs().max() / want_kv.abs().max())
            assert error < 1e-5 and bool((want_kv != 0).any()), (layer, error)


def test_padding_rows_repeat_the_last_real_row(loaded: LoadedModel) -> None:
    """Padding rows must hold valid inputs (every knob in range, reads in bounds): they repeat the last row."""
    runner = Engine(loaded, EngineConfig(max_canvases_in_flight=8, max_context=256)).runner
    region = StepRegion(runner.model, runner.cache, False, 4096)
    inputs = {"canvas_ids": torch.arange(96).view(3, 32), "full_table": torch.tensor([[5], [6], [7]]),
              "sliding_table": torch.tensor([[1, 2], [3, 4], [5, 6]]), "temperature": torch.tensor([0.5, 1.0, 2.0]),
              "top_k": torch.tensor([0, 20, 7])}
    buffers = region._padded(inputs)
    assert buffers["canvas_ids"].shape == (4, 32) and buffers["full_table"].shape == (4, 1)
    for name, value in inputs.items():
        assert torch.equal(buffers[name][:3], value) and torch.equal(buffers[name][3], value[2]), name


def test_cpu_inductor_uses_vectorised_kernels_and_cuda_uses_cuda_graphs() -> None:
    """The options StepRegion passes to torch.compile per device (engine/compiled_step.py, compile_options): no
    scalar-only `cpp.simdlen` on CPU, CUDA graphs on CUDA, no wrapper asserts and no parameter guards on both."""
    cpu, cuda = (compile_options(torch.device(kind), "inductor")["options"] for kind in ("cpu", "cuda"))
    common = {"size_asserts": False, "alignment_asserts": False, "guard_filter_fn": skip_parameter_guards}
    assert cpu == common and "cpp.simdlen" not in cpu
    assert cuda == {**common, "triton.cudagraphs": True}
    assert compile_options(torch.device("cpu"), "aot_eager") == {}


def test_engine_default_is_eager_on_cpu(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256))
    assert not engine.runner.step_region.compiled
    assert Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256, compile_step=True)
                  ).runner.step_region.compiled


def test_guard_filter_skips_parameter_checks_but_recompiles_for_a_changed_module() -> None:
    """`skip_parameter_guards` (engine/compiled_step.py): parameters are not checked but read at call time (a
    second module of the same kind shares the graph and gets its own output), and a changed module attribute the
    trace branched on still recompiles (dropping every module guard would reuse the stale graph)."""
    from torch._dynamo.testing import CompileCounter

    from engine.model import moe

    torch._dynamo.reset()
    counter = CompileCounter()

    def run(experts: moe.Experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return experts(x, weights, chosen)

    compiled = torch.compile(run, backend=counter, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": skip_parameter_guards})
    first, second = moe.Experts(4, 8, 4), moe.Experts(4, 8, 4)
    for experts, scale in ((first, 0.1), (second, 0.3)):
        torch.nn.init.normal_(experts.gate_up_proj, std=scale)
        torch.nn.init.normal_(experts.down_proj, std=scale)
        experts.backend = moe.DENSE
    x, weights, chosen = torch.randn(6, 8), torch.rand(6, 2), torch.tensor([[0, 1], [1, 2], [2, 3]] * 2)
    with torch.no_grad():
        got_first = compiled(first, x, weights, chosen)
        got_second = compiled(second, x, weights, chosen)
        assert torch.allclose(got_first, first(x, weights, chosen))
        assert torch.allclose(got_second, second(x, weights, chosen)) and not torch.allclose(got_first, got_second)
        assert counter.frame_count == 1
        first.backend = moe.LOOP  # the trace branched on it (the loop reads group bounds: a graph break)
        with pytest.raises(Exception, match="(?i)graph break|data-dependent|tolist|unsupported"):
            compiled(first, x, weights, chosen)
