"""Counter-based randomness: every random number is a pure function of (seed, canvas, step, position).

Why: a seeded request must draw the same random numbers whether it runs alone or batched with others, so no
random number may depend on the batch layout or on how many numbers were drawn before it (a stateful
generator would). (Its tokens can still differ alone vs batched where two candidates nearly tie, because the
model's GEMMs round differently at different row counts: docs/architecture.md, "Seeds and batching".) Each (request seed, canvas index, denoising step, stream) tuple is folded on the host
into one 64-bit key (`stream_key`). On the device a SplitMix64 finaliser maps key + position * golden-ratio
to 64 mixed bits: one uniform token id or one uniform float per position. Nothing is drawn per vocabulary id
(the sampler draws by inverse CDF from one uniform per position).

torch has no unsigned integers of these widths, so the maths runs in int64, relying on two's-complement
wrap-around of multiplication and addition (what every torch backend does), and logical right shifts are
emulated by masking after the arithmetic shift. `mix64_reference` is the same function on Python ints; tests
check they agree bit for bit.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MUL_1 = 0xBF58476D1CE4E5B9
_MIX_MUL_2 = 0x94D049BB133111EB
_UNIFORM_BITS = 23

# Independent streams drawn for one canvas step.
STREAM_SAMPLE = 1  # the categorical draw: one uniform per position (inverse CDF)
STREAM_RENOISE = 2  # uniform token ids for re-noised positions, one per position
STREAM_INITIAL_CANVAS = 3  # the canvas before the first step


def _as_signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN_GAMMA_S = _as_signed64(_GOLDEN_GAMMA)
_MIX_MUL_1_S = _as_signed64(_MIX_MUL_1)
_MIX_MUL_2_S = _as_signed64(_MIX_MUL_2)


def mix64_reference(x: int) -> int:
    """SplitMix64 finaliser on Python ints (unsigned 64-bit result): the specification of `mix64`."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX_MUL_1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX_MUL_2) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, canvas_index: int, step: int, stream: int) -> int:
    """Fold a request's seed and a canvas step into one key (as a signed int64 for torch)."""
    key = mix64_reference(seed & _MASK64)
    for part in (canvas_index, step, stream):
        key = mix64_reference(key ^ ((part & _MASK64) + _GOLDEN_GAMMA))
    return _as_signed64(key)


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (bits equal to `mix64_reference`, read as signed)."""
    x = (x ^ _logical_shift_right(x, 30)) * _MIX_MUL_1_S
    x = (x ^ _logical_shift_right(x, 27)) * _MIX_MUL_2_S
    return x ^ _logical_shift_right(x, 31)


def _opaque_counters(counters: torch.Tensor) -> torch.Tensor:
    """`counters` (non-negative, so `& INT64_MAX` leaves every bit as it is) behind a bitwise op.

    Why: inductor folds `torch.arange(n) * _GOLDEN_GAMMA_S` into the index expression `x0 * gamma`, and its
    vectorised C++ (torch 2.13, AVX2) materialises that as `VectorizedN<int64_t, 2>::arange(x0 * gamma, gamma)`,
    whose `base + k * step` overflows a signed 64-bit integer: undefined behaviour that gcc -O3 turned into a
    SIGSEGV (and a step below 2**31, an int literal, into wrong bits). A bitwise op is outside inductor's index
    arithmetic, so the multiply stays a vector multiply of values, which wraps (tests/engine/test_rng_inductor.py).
    """
    return counters & _INT64_MAX


def hashed_bits(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """64 mixed bits for every (key, counter) pair.

    keys: int64 [B]; counters: non-negative int64 of any shape S (broadcast against each key). Returns int64
    [B, *S].
    """
    view = keys.reshape(keys.shape + (1,) * counters.dim())
    return mix64(view + _opaque_counters(counters).unsqueeze(0) * _GOLDEN_GAMMA_S)


def uniform_token_ids(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform ids in [0, vocab_size): int64 [B, *positions.shape].

    Multiply-shift on the top 32 bits (exact for vocab_size < 2**31, no modulo bias worth noting).
    """
    if not 0 < vocab_size < 1 << 31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    top = _logical_shift_right(hashed_bits(keys, positions), 32)
    return (top * vocab_size) >> 32


def position_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One float32 uniform strictly inside (0, 1) per (key, position): [B, *positions.shape].

    (k + 0.5) / 2**23 from the top 23 hash bits: k + 0.5 is exact in float32, so the largest value is
    1 - 2**-24 and u * S rounds strictly below S for any positive float32 S (the sampler relies on it).
    """
    top = _logical_shift_right(hashed_bits(keys, positions), 64 - _UNIFORM_BITS)
    return top.to(torch.float32).add_(0.5).mul_(1.0 / (1 << _UNIFORM_BITS))
