"""The per-chunk passes of the sampler's vocabulary scan (engine/sampler.py), eager or compiled.

# B canvases, C canvas length, v ids in one vocabulary chunk

Each kernel reads one chunk of the fp32 logits [B, C, v] and recomputes z - max z = (logits - max logit) / T per chunk, so the
scan never writes a vocabulary-sized tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def shifted_z(chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None) -> torch.Tensor:
    """z - max z of a vocabulary chunk, z = logits / T: (chunk [B, C, v] - max_logit [B, C]) * (1 / T) [B, 1, 1],
    in fp32 (one chunk-sized temporary, scaled in place; None = T is 1, nothing to scale)."""
    shifted = chunk.float() - max_logit.unsqueeze(-1)
    return shifted if inv_temperature is None else shifted.mul_(inv_temperature)


def chunk_statistics(chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary chunk of logits [B, C, v] -> (sum w, sum w (z - max z)) with w = exp(z - max z), each
    [B, C]. Pure: reads its inputs, writes only temporaries."""
    shifted = shifted_z(chunk, max_logit, inv_temperature)
    weights = shifted.exp()
    return weights.sum(dim=-1), torch.linalg.vecdot(weights, shifted)


def chunk_search(chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None,
                 threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF search inside one chunk of logits [B, C, v]: (how many ids have a chunk-local cumulative
    weight sum exp(z - max z) <= threshold, the chunk's total weight), each [B, C]. Pure, like
    `chunk_statistics`.

    The local cumulative sum is non-decreasing, so the ids counted are a prefix of the chunk and the first
    id not counted has a positive weight whenever threshold >= 0."""
    cumulative = shifted_z(chunk, max_logit, inv_temperature).exp_().cumsum(dim=-1)
    below = torch.searchsorted(cumulative, threshold.unsqueeze(-1).contiguous(), right=True)
    return below.squeeze(-1), cumulative[..., -1]


class ChunkKernels:
    """The two per-chunk passes of the vocabulary scan, eager. Subclasses may compile them."""

    def statistics(self, chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_statistics(chunk, max_logit, inv_temperature)

    def search(self, chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None,
               threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_search(chunk, max_logit, inv_temperature, threshold)


EAGER_KERNELS = ChunkKernels()


@functools.cache
def compiled_kernel(function: Callable[..., tuple[torch.Tensor, torch.Tensor]], backend: str = "inductor"
                    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`function` through torch.compile (on CUDA a fused kernel per chunk instead of several passes)."""
    return torch.compile(function, dynamic=True, backend=backend)


class CompiledWithFallback(ChunkKernels):
    """The compiled chunk passes, falling back to eager for good if compiling or running them fails
    (a missing compiler toolchain must cost speed, never requests). Safe to retry: the passes are pure."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.failed_with: Exception | None = None

    def _run(self, function: Callable[..., tuple[torch.Tensor, torch.Tensor]], *args: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed_with is None:
            try:
                return compiled_kernel(function, self.backend)(*args)
            except Exception as err:  # torch.compile raises backend-specific error types
                self.failed_with = err
        return function(*args)

    def statistics(self, chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(chunk_statistics, chunk, max_logit, inv_temperature)

    def search(self, chunk: torch.Tensor, max_logit: torch.Tensor, inv_temperature: torch.Tensor | None,
               threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(chunk_search, chunk, max_logit, inv_temperature, threshold)
