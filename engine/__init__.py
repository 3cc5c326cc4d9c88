"""dgserve engine: DiffusionGemma inference in pure PyTorch with step-level continuous batching.

Public surface (docs/architecture.md): `load_model` a checkpoint, build an `Engine`, then either
`generate(requests)` (scripts, benchmarks, tests) or, as a server does, `add_request` and call `step()` until
`has_unfinished()` is False. Outputs carry token ids; decode them with the engine's `tokenizer`.
"""

from engine.engine import Engine
from engine.loader import LoadedModel, load_model
from engine.types import (
    EngineConfig,
    EngineRequest,
    GenerationDefaults,
    InfillCanvas,
    RequestResult,
    RequestStats,
    SamplingParams,
    StepOutput,
    StepStats,
    TokenLogprob,
)

__all__ = [
    "Engine", "EngineConfig", "EngineRequest", "GenerationDefaults", "InfillCanvas", "LoadedModel",
    "RequestResult", "RequestStats", "SamplingParams", "StepOutput", "StepStats", "TokenLogprob", "load_model",
]
