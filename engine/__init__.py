"""dgserve engine: DiffusionGemma inference in pure PyTorch with step-level continuous batching.

Public surface (docs/architecture.md): `load_model` a checkpoint, build an `Engine`, feed it
`EngineRequest`s and call `step()` until `has_unfinished()` is False.
"""

from engine.engine import Engine
from engine.loader import LoadedModel, load_model
from engine.types import (
    EngineConfig,
    EngineRequest,
    GenerationDefaults,
    InfillCanvas,
    RequestStats,
    SamplingParams,
    StepOutput,
    StepStats,
    TokenLogprob,
)

__all__ = [
    "Engine", "EngineConfig", "EngineRequest", "GenerationDefaults", "InfillCanvas", "LoadedModel",
    "RequestStats", "SamplingParams", "StepOutput", "StepStats", "TokenLogprob", "load_model",
]
