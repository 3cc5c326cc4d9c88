"""Counter-based randomness: every random number is a pure function of (seed, canvas, step, position, id).

Why: a seeded request must produce the same tokens whether it runs alone or batched with others, so no
random number may depend on the batch layout or on how many numbers were drawn before it (a stateful
generator would). Each (request seed, canvas index, denoising step, stream) tuple is folded on the host
into one 64-bit key (`stream_key`). On the device a SplitMix64 finaliser maps key + position * golden-ratio
to 64 mixed bits (uniform token ids: one per position), and per-vocabulary noise (one number per position
and vocab id, the hot path) hashes a 32-bit per-position key plus the vocab id with lowbias32.

torch has no unsigned integers of these widths, so the maths runs in int64 / int32, relying on two's-complement
wrap-around of multiplication and addition (what every torch backend does), and logical right shifts are
emulated by masking after the arithmetic shift. `mix64_reference` and `lowbias32_reference` are the same
functions on Python ints; tests check they agree bit for bit.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MUL_1 = 0xBF58476D1CE4E5B9
_MIX_MUL_2 = 0x94D049BB133111EB

# Independent streams drawn for one canvas step.
STREAM_GUMBEL = 1  # Gumbel-max sampling noise, one number per (position, vocab id)
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


def hashed_bits(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """64 mixed bits for every (key, counter) pair.

    keys: int64 [B]; counters: int64 of any shape S (broadcast against each key). Returns int64 [B, *S].
    """
    view = keys.reshape(keys.shape + (1,) * counters.dim())
    return mix64(view + counters.unsqueeze(0) * _GOLDEN_GAMMA_S)


def uniform_token_ids(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform ids in [0, vocab_size): int64 [B, *positions.shape].

    Multiply-shift on the top 32 bits (exact for vocab_size < 2**31, no modulo bias worth noting).
    """
    if not 0 < vocab_size < 1 << 31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    top = _logical_shift_right(hashed_bits(keys, positions), 32)
    return (top * vocab_size) >> 32


# ----- per-vocabulary noise: the hot path, one number per (canvas, position, vocab id) -----
#
# Hashing [B, C, V] with 64-bit SplitMix would dominate a CPU step, so the vocabulary level uses a 32-bit
# finaliser (lowbias32, C. Wellons) on int32 tensors: the 64-bit stream key and the position are first folded
# into one 32-bit key per (canvas, position) with SplitMix64 (only [B, C] of them), then each vocab id is
# hashed as lowbias32(position_key + id * golden32). int32 multiplication wraps like uint32 in the low bits.

_MASK32 = (1 << 32) - 1
_GOLDEN_32 = 0x9E3779B9
_LOWBIAS_MUL_1 = 0x7FEB352D
_LOWBIAS_MUL_2 = 0x846CA68B


def _as_signed32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def lowbias32_reference(x: int) -> int:
    """The lowbias32 finaliser on Python ints (unsigned 32-bit result): the specification of `lowbias32`."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _LOWBIAS_MUL_1) & _MASK32
    x ^= x >> 15
    x = (x * _LOWBIAS_MUL_2) & _MASK32
    return x ^ (x >> 16)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int32 tensor (bits equal to `lowbias32_reference`, read as signed). Overwrites `x`
    (the hot path: in-place passes with one scratch tensor)."""
    scratch = torch.empty_like(x)
    for shift, multiplier in ((16, _LOWBIAS_MUL_1), (15, _LOWBIAS_MUL_2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=scratch)
        scratch &= (1 << (32 - shift)) - 1  # logical shift: clear the copied sign bits
        x ^= scratch
        if multiplier is not None:
            x *= _as_signed32(multiplier)
    return x


def position_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (stream key, position): int32 [B, C] (the top half of SplitMix64)."""
    top = _logical_shift_right(hashed_bits(keys, positions), 32)
    return (top - ((top >> 31) << 32)).to(torch.int32)  # reinterpret the unsigned 32 bits as int32


def vocab_uniforms(pos_keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """float32 uniforms strictly inside (0, 1) for every (position key [B, C], vocab id [v]) -> [B, C, v]."""
    counters = (vocab_ids.to(torch.int32) * _as_signed32(_GOLDEN_32)).view(1, 1, -1)
    return open_unit_interval(lowbias32(pos_keys.unsqueeze(-1) + counters))


def open_unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Map int32 hash bits to float32 (k + 0.5) / 2**23 from their top 23 bits: strictly inside (0, 1).
    Overwrites `bits`.

    23 bits, not 24: k + 0.5 must be exact in float32, so that 1 - 2**-24 never rounds up to 1.0 (log 0).
    """
    bits >>= 9  # arithmetic shift: an integer in [-2**22, 2**22)
    return bits.to(torch.float32).add_((1 << 22) + 0.5).mul_(1.0 / (1 << 23))
