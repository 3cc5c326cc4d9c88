"""Wire sampler options → `engine.types.SamplingParams`, refusing knobs this engine build does not know."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from engine.types import SamplingParams
from services.schemas import SAMPLER_KNOBS

_ENGINE_PARAMS = frozenset(f.name for f in fields(SamplingParams))


def sampling_params_of(options: dict[str, Any]) -> SamplingParams:
    """`SamplingParams` of a job's set options (`SamplingOptions.sampling_params()`). A knob the engine does
    not know raises ValueError naming it (the job fails with that message; it is never silently dropped)."""
    unknown = sorted(set(options) - _ENGINE_PARAMS)
    if unknown:
        raise ValueError(f"{unknown[0]}: this worker's engine does not support the sampler knob(s) "
                         f"{', '.join(unknown)} (the per-request knobs {', '.join(SAMPLER_KNOBS)} need the "
                         "engine's sampler knobs)")
    return SamplingParams(**options)
