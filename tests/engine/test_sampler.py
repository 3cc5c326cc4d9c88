"""Sampler maths: counter-based RNG, inverse-CDF draw, entropy-bound acceptance, stopping, infill clamping."""

from __future__ import annotations

import math

import pytest
import torch

from engine import rng
from engine.sampler import (
    CanvasState,
    SamplerInputs,
    denoise_step,
    entropy_bound_accept,
    initial_canvas,
    scan_vocabulary,
    temperature_at,
)

# B canvases, C canvas length, V vocab


def make_inputs(batch: int, *, temperature: float = 1.0, bound: float = 0.5, confidence: float = 0.01,
                stability: int = 1, may_stop: bool = True, step: int = 1, seeds: list[int] | None = None
                ) -> SamplerInputs:
    seeds = seeds if seeds is not None else list(range(batch))
    return SamplerInputs(
        temperature=torch.full((batch,), temperature),
        entropy_bound=torch.full((batch,), bound),
        confidence_threshold=torch.full((batch,), confidence),
        stability_threshold=torch.full((batch,), stability, dtype=torch.int64),
        may_stop_early=torch.full((batch,), may_stop),
        sample_keys=torch.tensor([rng.stream_key(s, 0, step, rng.STREAM_SAMPLE) for s in seeds]),
        renoise_keys=torch.tensor([rng.stream_key(s, 0, step, rng.STREAM_RENOISE) for s in seeds]),
    )


def scan(z: torch.Tensor, keys: torch.Tensor, chunk: int, *args) -> tuple[torch.Tensor, ...]:
    """(sampled, argmax, entropy) of one vocabulary scan."""
    result = scan_vocabulary(z, keys, chunk, *args)
    return result.sampled, result.argmax, result.entropy


def make_state(batch: int, length: int, vocab: int, is_fixed: torch.Tensor | None = None,
               fixed_ids: torch.Tensor | None = None) -> CanvasState:
    gen = torch.Generator().manual_seed(7)
    return CanvasState(
        canvas_ids=torch.randint(0, vocab, (batch, length), generator=gen),
        prev_argmax=torch.full((batch, length), -1, dtype=torch.int64),
        stable_steps=torch.zeros(batch, dtype=torch.int64),
        is_fixed=is_fixed if is_fixed is not None else torch.zeros(batch, length, dtype=torch.bool),
        fixed_ids=fixed_ids if fixed_ids is not None else torch.zeros(batch, length, dtype=torch.int64),
    )


def test_mix64_matches_python_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**63), 2**63 - 1, (1000,), generator=gen, dtype=torch.int64)
    values = torch.cat([values, torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
    ours = rng.mix64(values).tolist()
    expected = [rng.mix64_reference(v) for v in values.tolist()]
    assert [v & (2**64 - 1) for v in ours] == expected


def test_position_uniforms_are_the_top_23_bits_of_splitmix() -> None:
    keys = torch.tensor([rng.stream_key(9, 1, 2, rng.STREAM_SAMPLE), -5])
    got = rng.position_uniforms(keys, torch.arange(6)).tolist()
    for row, key in zip(got, keys.tolist(), strict=True):
        expected = [((rng.mix64_reference(key + p * 0x9E3779B97F4A7C15) >> 41) + 0.5) / 2**23 for p in range(6)]
        assert row == expected  # exact: k + 0.5 over a power of two is representable in float32


def test_largest_uniform_times_any_total_stays_below_the_total() -> None:
    # The sampler's target u * S must stay strictly below S in float32, or every id would pass the search.
    largest = torch.tensor((2**23 - 1 + 0.5) / 2**23, dtype=torch.float32)
    assert float(largest) < 1.0
    gen = torch.Generator().manual_seed(0)
    totals = torch.cat([torch.rand(100_000, generator=gen) * 262_144 + 1.0,
                        torch.tensor([2.0**e for e in range(19)]),
                        torch.tensor([2.0**e for e in range(19)]).nextafter(torch.tensor(1e9))])
    assert bool((largest * totals < totals).all())


def test_uniforms_and_token_ids_are_in_range_and_roughly_uniform() -> None:
    keys = torch.tensor([rng.stream_key(s, 0, 1, rng.STREAM_SAMPLE) for s in range(4)])
    u = rng.position_uniforms(keys, torch.arange(50_000))
    assert u.shape == (4, 50_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    deciles = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert float((deciles - 0.1).abs().max()) < 0.004
    ids = rng.uniform_token_ids(keys, torch.arange(50_000), 7)
    counts = torch.bincount(ids.flatten(), minlength=7).float()
    assert int(ids.min()) == 0 and int(ids.max()) == 6
    assert float((counts / counts.sum() - 1 / 7).abs().max()) < 0.01


def test_stream_keys_differ_by_every_component() -> None:
    base = rng.stream_key(1, 0, 1, rng.STREAM_SAMPLE)
    others = [rng.stream_key(2, 0, 1, rng.STREAM_SAMPLE), rng.stream_key(1, 1, 1, rng.STREAM_SAMPLE),
              rng.stream_key(1, 0, 2, rng.STREAM_SAMPLE), rng.stream_key(1, 0, 1, rng.STREAM_RENOISE)]
    assert len({base, *others}) == 5


def test_temperature_schedule_matches_reference_processor() -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    steps, t_min, t_max = 12, 0.4, 0.8
    processor = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=steps)
    scores = torch.ones(1, 3)
    for our_step, reference_step in zip(range(1, steps + 1), reversed(range(1, steps + 1)), strict=True):
        expected = 1.0 / float(processor(None, scores, cur_step=reference_step)[0, 0])
        assert temperature_at(our_step, steps, t_min, t_max) == pytest.approx(expected, rel=1e-6)
    assert temperature_at(1, steps, t_min, t_max) == pytest.approx(t_max)


@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_scan_vocabulary_matches_direct_computation(chunk: int) -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, 97, generator=gen) * 3
    keys = torch.tensor([11, 12, 13])
    sampled, argmax, entropy = scan(z, keys, chunk)
    expected_entropy = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, z.argmax(-1))
    # inverse CDF in float64 with the same uniforms: the first id whose cumulative probability exceeds u
    # (float32 sums could differ from it only when u lies within rounding of a boundary; not on this data)
    u = rng.position_uniforms(keys, torch.arange(8)).double()
    cdf = z.double().softmax(-1).cumsum(-1)
    assert torch.equal(sampled, torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_samples_follow_the_softmax_chi_square() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])
    positions, draws = 20_000, []
    z = probs.log().expand(1, positions, 7).contiguous()
    for seed in range(3):  # several seeds and steps: each draw is a fresh stream
        for step in (1, 2):
            keys = torch.tensor([rng.stream_key(seed, 0, step, rng.STREAM_SAMPLE)])
            draws.append(scan(z, keys, 3)[0].flatten())  # 3 chunks, the last partial
    counts = torch.bincount(torch.cat(draws), minlength=7).double()
    # 6 degrees of freedom: P(chi2 > 27.9) = 1e-4, so a correct sampler fails this about once in 10^4 seeds;
    # a sampler off by 1 % of mass on any id gives chi2 in the hundreds at n = 120k.
    assert chi_square(counts, probs.double()) < 27.9
    counts_one = torch.bincount(draws[0], minlength=7).double()
    assert chi_square(counts_one, probs.double()) < 27.9


def test_never_draws_an_id_with_zero_probability_mass() -> None:
    # exp(z - max) underflows to exactly 0 in float32 below about -104: those ids have no mass at all.
    # They sit first, at chunk starts and ends, and last (where a target rounded up to the total would land).
    vocab, chunk, positions = 40, 8, 50_000
    zero_mass = torch.zeros(vocab, dtype=torch.bool)
    zero_mass[[0, 7, 8, 15, 16, 23, 30, 31, 32, 36, 37, 38, 39]] = True
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(2, positions, vocab, generator=gen) * 4
    z[:, :, zero_mass] = -300.0
    sampled, _, _ = scan(z, torch.tensor([21, 22]), chunk)
    assert not bool(zero_mass[sampled].any())
    drawn = torch.bincount(sampled.flatten(), minlength=vocab)
    assert bool((drawn[~zero_mass] > 0).all())  # every id with mass is reachable
    single = torch.full((1, 1000, vocab), -300.0)
    single[:, :, 35] = 2.0  # only one id has mass, and it is the last one with mass
    assert bool((scan(single, torch.tensor([5]), chunk)[0] == 35).all())


def test_inverse_cdf_search_across_chunks_and_past_the_total() -> None:
    from engine.sampler import EAGER_KERNELS, inverse_cdf_draw

    # weights exp(z - max): ids 2 -> 0.5, 4 -> 1, every other id exactly 0; chunks of 3: [0 0 .5 | 0 1 0 | 0 0]
    row = torch.full((8,), -300.0)
    row[2], row[4] = math.log(0.5), 0.0
    targets = torch.tensor([[0.0, 0.4, 0.6, 1.4, 1.6, 1e9]])
    z = row.expand(1, targets.shape[1], 8).contiguous()
    count = inverse_cdf_draw(z, z.max(dim=-1).values, torch.ones(1, 1, 1), targets, 3, EAGER_KERNELS)
    assert count.tolist() == [[2, 2, 4, 4, 8, 8]]  # 8 = V: past the total, the caller takes the argmax


def test_acceptance_keeps_lowest_entropy_prefix_under_the_bound() -> None:
    entropy = torch.tensor([[0.30, 0.05, 0.02, 0.50, 0.01]])
    keep = entropy_bound_accept(entropy, torch.tensor([0.1]), torch.zeros(1, 5, dtype=torch.bool))
    # sorted 0.01, 0.02, 0.05, 0.30, 0.50 -> sums before: 0, .01, .03, .08, .38 -> first four kept
    assert keep.tolist() == [[True, True, True, False, True]]
    tight = entropy_bound_accept(entropy, torch.tensor([1e-9]), torch.zeros(1, 5, dtype=torch.bool))
    assert tight.sum().item() == 1 and bool(tight[0, 4])  # at least the most confident position


def test_sampler_decisions_match_reference_classes_given_identical_noise() -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
    )

    batch, length, vocab = 4, 32, 50
    gen = torch.Generator().manual_seed(5)
    for bound, scale in [(0.1, 6.0), (0.5, 3.0), (2.0, 1.0), (30.0, 0.5)]:
        raw = torch.randn(batch, length, vocab, generator=gen) * scale
        state = make_state(batch, length, vocab)
        inputs = make_inputs(batch, temperature=0.7, bound=bound)
        logits = raw.clone()
        out = denoise_step(logits, state, inputs, vocab_chunk=16)
        z = raw / 0.7
        assert torch.equal(logits, raw)  # the logits are only read
        sampled, _, _ = scan(z, inputs.sample_keys, 16)
        renoise = rng.uniform_token_ids(inputs.renoise_keys, torch.arange(length), vocab)

        reference = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), length, vocab, 8)
        reference.initialize_canvas = lambda batch_size, device, ids=renoise: ids  # inject our re-noise draw
        accepted = reference.accept_canvas(state.canvas_ids, sampled, z, cur_step=1)
        expected_next = reference.renoise_canvas(accepted, cur_step=1)
        assert torch.equal(out.next_canvas, expected_next), f"bound={bound}"
        assert 0 < int(reference.accepted_token_mask.sum()) <= batch * length


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_stop_decisions_match_reference_criteria_over_a_run(stability: int) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        StableAndConfidentStoppingCriteria,
    )

    batch, length, vocab, threshold = 3, 6, 20, 0.02
    gen = torch.Generator().manual_seed(stability)
    reference = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=threshold)
    state = make_state(batch, length, vocab)
    winners = torch.randint(0, vocab, (batch, length, 1), generator=gen)
    base = torch.randn(batch, length, vocab, generator=gen) * 0.3
    base.scatter_(-1, winners, 2.0)
    seen_true = seen_false = False
    for step in range(1, 9):
        # sharpen over time so entropy crosses the threshold; perturb canvas 1 to change its argmax now and then
        z = base * (1.0 + 4.0 * step)
        if step % 3 == 0:
            z[1, 0] = torch.randn(vocab, generator=gen) * 50
        inputs = make_inputs(batch, bound=0.3, confidence=threshold, stability=stability, step=step)
        out = denoise_step(z.clone(), state, inputs, vocab_chunk=7)
        expected = reference(z.argmax(-1), z)
        assert torch.equal(out.converged, expected), f"step {step}"
        seen_true |= bool(expected.any())
        seen_false |= bool((~expected).any())
        state = CanvasState(out.next_canvas, out.argmax, out.stable_steps, state.is_fixed, state.fixed_ids)
    assert seen_true and seen_false  # the scenario exercises both decisions


def test_fixed_steps_canvases_never_converge() -> None:
    z = torch.zeros(2, 4, 10)
    z[..., 3] = 100.0  # certain
    state = make_state(2, 4, 10)
    state = CanvasState(state.canvas_ids, torch.full((2, 4), 3), torch.ones(2, dtype=torch.int64),
                        state.is_fixed, state.fixed_ids)
    inputs = make_inputs(2)
    inputs = SamplerInputs(**{**inputs.__dict__, "may_stop_early": torch.tensor([True, False])})
    out = denoise_step(z, state, inputs, vocab_chunk=10)
    assert out.converged.tolist() == [True, False]


def test_fixed_positions_are_clamped_accepted_and_never_renoised() -> None:
    batch, length, vocab = 2, 16, 40
    is_fixed = torch.zeros(batch, length, dtype=torch.bool)
    is_fixed[:, ::3] = True
    fixed_ids = torch.arange(length).expand(batch, length) + 5
    state = make_state(batch, length, vocab, is_fixed=is_fixed, fixed_ids=fixed_ids)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        z = torch.randn(batch, length, vocab, generator=gen) * 2
        out = denoise_step(z, state, make_inputs(batch, bound=0.2, step=step), vocab_chunk=8)
        assert torch.equal(out.next_canvas[is_fixed], fixed_ids[is_fixed])
        assert torch.equal(out.argmax[is_fixed], fixed_ids[is_fixed])
        state = CanvasState(out.next_canvas, out.argmax, out.stable_steps, is_fixed, fixed_ids)
    start = initial_canvas(torch.tensor([1, 2]), length, vocab, is_fixed, fixed_ids)
    assert torch.equal(start[is_fixed], fixed_ids[is_fixed])


def test_each_canvas_is_independent_of_its_batch_neighbours() -> None:
    batch, length, vocab = 4, 12, 64
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(batch, length, vocab, generator=gen) * 2
    state = make_state(batch, length, vocab)
    inputs = make_inputs(batch, seeds=[101, 202, 303, 404])
    together = denoise_step(z.clone(), state, inputs, vocab_chunk=16)
    for b in range(batch):
        one = lambda t, b=b: t[b:b + 1]  # noqa: E731
        alone = denoise_step(
            z[b:b + 1].clone(),
            CanvasState(*(one(t) for t in (state.canvas_ids, state.prev_argmax, state.stable_steps,
                                           state.is_fixed, state.fixed_ids))),
            SamplerInputs(*(one(t) for t in inputs.__dict__.values() if t is not None)),
            vocab_chunk=16,
        )
        assert torch.equal(alone.next_canvas[0], together.next_canvas[b])
        assert torch.equal(alone.argmax[0], together.argmax[b])


def test_entropy_of_uniform_logits_is_log_vocab() -> None:
    _, _, entropy = scan(torch.zeros(1, 2, 300), torch.tensor([1]), 64)
    torch.testing.assert_close(entropy, torch.full((1, 2), math.log(300)))


def test_compile_failure_falls_back_to_the_eager_statistics() -> None:
    from engine.sampler import CompiledWithFallback

    z = torch.randn(2, 4, 50)
    keys = torch.tensor([5, 6])
    broken = CompiledWithFallback(backend="no_such_backend")  # torch.compile rejects it when first called
    sampled, argmax, entropy = scan(z, keys, 16, broken)
    want_sampled, want_argmax, want_entropy = scan(z, keys, 16)
    assert torch.equal(sampled, want_sampled) and torch.equal(argmax, want_argmax)
    assert torch.equal(entropy, want_entropy)
    assert broken.failed_with is not None


@pytest.mark.slow
def test_compiled_scan_matches_eager() -> None:
    from engine.sampler import CompiledWithFallback

    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 8, 300, generator=gen) * 3
    keys = torch.tensor([rng.stream_key(s, 0, 1, rng.STREAM_SAMPLE) for s in range(3)])
    compiled = CompiledWithFallback()
    sampled, argmax, entropy = scan(z, keys, 128, compiled)
    assert compiled.failed_with is None  # it really ran compiled
    want_sampled, want_argmax, want_entropy = scan(z, keys, 128)
    assert torch.equal(sampled, want_sampled) and torch.equal(argmax, want_argmax)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
