"""The counter-based RNG and the sampler's re-noise blend compiled by inductor into vectorised C++ (the CPU
compile options of engine/compiled_step.py): the same bits as eager, and no crash.

Before engine/rng.py kept its counter multiply out of inductor's index arithmetic (`rng._opaque_counters`),
inductor's vectorised kernel for exactly this function ran `VectorizedN<int64_t, 2>::arange(x0 * gamma, gamma)`,
whose signed 64-bit overflow gcc -O3 compiled into a SIGSEGV. The kernel runs in a child process so that a crash
is this test's failure, not the end of the test session; it is small (one kernel, seconds to compile)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import os
    from pathlib import Path

    import torch
    from engine import rng
    from engine.sampler import next_canvas_ids

    VOCAB = 262_144

    def renoise(keep, sampled, is_fixed, fixed_ids, keys):
        positions = torch.arange(keep.shape[1], dtype=torch.int64)
        renoise_ids = rng.uniform_token_ids(keys, positions, VOCAB)
        uniforms = rng.position_uniforms(keys, positions)
        return next_canvas_ids(keep, sampled, renoise_ids, is_fixed, fixed_ids), uniforms

    generator = torch.Generator().manual_seed(0)
    batch, length = 3, 37  # not a multiple of the vector width: the tail loop runs too
    keep = torch.rand(batch, length, generator=generator) > 0.5
    is_fixed = torch.rand(batch, length, generator=generator) > 0.8
    sampled = torch.randint(0, VOCAB, (batch, length), generator=generator)
    fixed_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    keys = torch.tensor([rng.stream_key(seed, 0, 5, rng.STREAM_RENOISE) for seed in (0, 77, 2**40 + 3)])
    args = (keep, sampled, is_fixed, fixed_ids, keys)
    want_ids, want_uniforms = renoise(*args)
    compiled = torch.compile(renoise, fullgraph=True, dynamic=False, backend="inductor")
    got_ids, got_uniforms = compiled(*args)
    assert torch.equal(got_ids, want_ids), (got_ids != want_ids).sum()
    assert torch.equal(got_uniforms, want_uniforms)
    # The eager side is itself the specification: SplitMix64 on Python ints (bits checked in test_sampler.py).
    for row, key in enumerate(keys.tolist()):
        for position in (0, 1, 2, length - 1):
            bits = rng.mix64_reference(key + position * 0x9E3779B97F4A7C15)
            want = ((bits >> 32) * VOCAB) >> 32
            if bool(~keep[row, position] & ~is_fixed[row, position]):
                assert got_ids[row, position].item() == want, (row, position)
    sources = [path.read_text() for path in Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.cpp")]
    print("vector_kernel", any("at::vec::VectorizedN<int64_t" in source for source in sources))
""")


@pytest.mark.slow
def test_inductor_vectorised_renoise_kernel_gives_the_eager_bits(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # a fresh cache: the kernel is really built
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    # the kernel took inductor's explicit vector path (what crashed), not a scalar fallback
    assert result.stdout.split()[-1] == "True", result.stdout
