"""What a runnable job request is: the one definition that the API (at submit) and the engine (at
`Engine.add_request`) both apply, so a request the API accepts is one the engine runs.

Three kinds of rule, all torch-free:

* **Sampling bounds** (`SAMPLING_BOUNDS`): the type and range of each sampler knob. The wire schema
  (services/schemas.py) builds its fields from this table; `resolve_sampling` checks a request's values
  after the model's defaults fill the unset ones, including the one cross-field rule, `t_min <= t_max`
  (equal is allowed: a constant temperature).
* **Positions** (`ModelLimits`, `check_generate_positions`, `check_infill_positions`): a request occupies
  context positions for its prompt, for the fixed text encoded before each infill canvas, and for
  `canvas_length` positions per canvas; the total must not exceed `ModelLimits.max_positions`, the
  context one request may use on the served engine.
* **Edit spans** live in `dgtext.edits.resolve_edits`; its `EditValidationError` is a `RequestFieldError`.

Every refusal is a `RequestFieldError`: a `ValueError` that names the offending field (`max_new_tokens`,
`prompt`, `edits[2]`, ...) so the API can answer 422 with that field and the engine can refuse with the
same message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class RequestFieldError(ValueError):
    """A request that cannot run; `field` names the offending field (e.g. `t_max`, `edits[2]`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Bound:
    """The accepted values of one numeric knob: `kind` (int or float), a lower bound (`minimum`, inclusive
    or not) and an inclusive `maximum`. Booleans are never numbers here; an int knob takes only ints."""

    kind: type
    minimum: float
    minimum_inclusive: bool
    maximum: float

    def describe(self) -> str:
        low = ">=" if self.minimum_inclusive else ">"
        return f"{'an integer' if self.kind is int else 'a number'} {low} {self.minimum} and <= {self.maximum}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        above = value >= self.minimum if self.minimum_inclusive else value > self.minimum
        return above and value <= self.maximum


# The sampler knobs of a job (engine.types.SamplingParams without the flags). t_max divides the logits, so it
# must be positive; t_min may be 0 (greedy at the last step).
SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_new_tokens": Bound(int, 1, True, 1_000_000),
    "max_denoising_steps": Bound(int, 1, True, 4096),
    "entropy_bound": Bound(float, 0, False, 1000),
    "t_min": Bound(float, 0, True, 100),
    "t_max": Bound(float, 0, False, 100),
    "confidence_threshold": Bound(float, 0, False, 1000),
    "stability_threshold": Bound(int, 0, True, 4096),
    "seed": Bound(int, 0, True, 2**63 - 1),
}
# Knobs a checkpoint's generation_config.json gives defaults for (all of SAMPLING_BOUNDS but the seed).
DEFAULTED_KNOBS: tuple[str, ...] = tuple(name for name in SAMPLING_BOUNDS if name != "seed")
# The published defaults of the reference generation config, for keys a checkpoint leaves out.
REFERENCE_SAMPLING_DEFAULTS: dict[str, int | float] = {
    "max_new_tokens": 256, "max_denoising_steps": 48, "entropy_bound": 0.1, "t_min": 0.4, "t_max": 0.8,
    "stability_threshold": 1, "confidence_threshold": 0.005,
}


def check_knob(name: str, value: Any) -> None:
    """Raise `RequestFieldError(name)` unless `value` is within `SAMPLING_BOUNDS[name]`."""
    bound = SAMPLING_BOUNDS[name]
    if not bound.admits(value):
        raise RequestFieldError(name, f"must be {bound.describe()}, got {value!r}")


def sampling_defaults_from_generation_config(generation_config: Mapping[str, Any]) -> dict[str, int | float]:
    """The sampler defaults of a checkpoint's `generation_config.json` (reference values for missing keys;
    the entropy bound may sit in `sampler_config`)."""
    values = dict(REFERENCE_SAMPLING_DEFAULTS)
    sampler_config = generation_config.get("sampler_config")
    if isinstance(sampler_config, Mapping) and sampler_config.get("entropy_bound") is not None:
        values["entropy_bound"] = float(sampler_config["entropy_bound"])
    for name in DEFAULTED_KNOBS:
        if generation_config.get(name) is not None:
            values[name] = generation_config[name]
    return values


def resolve_sampling(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every defaulted knob, from `given` where it is not None, else from `defaults`, checked against
    `SAMPLING_BOUNDS` and `t_min <= t_max`; a given `seed` is checked too and kept. The error names the
    field the caller set (a model default is never the caller's fault, so the set field is blamed)."""
    resolved: dict[str, Any] = {}
    for name in DEFAULTED_KNOBS:
        value = given.get(name)
        resolved[name] = defaults.get(name, REFERENCE_SAMPLING_DEFAULTS[name]) if value is None else value
        check_knob(name, resolved[name])
    if given.get("seed") is not None:
        check_knob("seed", given["seed"])
        resolved["seed"] = given["seed"]
    if resolved["t_min"] > resolved["t_max"]:
        blamed = "t_max" if given.get("t_max") is not None else "t_min"
        origin = {name: "" if given.get(name) is not None else " (the model's default)" for name in ("t_min", "t_max")}
        raise RequestFieldError(blamed, f"t_max {resolved['t_max']}{origin['t_max']} is below t_min "
                                f"{resolved['t_min']}{origin['t_min']}; t_min <= t_max is required")
    return resolved


@dataclass(frozen=True)
class ModelLimits:
    """What the served model and engine allow one request: `canvas_length` (positions per canvas),
    `max_positions` (context positions one request may occupy: prompt + infill leading text + canvases),
    and the checkpoint's `sampling_defaults` (knob name -> value). Workers publish these; the API checks
    submissions against them."""

    canvas_length: int
    max_positions: int
    sampling_defaults: Mapping[str, int | float] = field(default_factory=lambda: dict(REFERENCE_SAMPLING_DEFAULTS))

    def __post_init__(self) -> None:
        for name in ("canvas_length", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelLimits.{name} must be a positive integer, got {value!r}")

    def to_json_dict(self) -> dict[str, Any]:
        return {"canvas_length": self.canvas_length, "max_positions": self.max_positions,
                "sampling_defaults": dict(self.sampling_defaults)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ModelLimits:
        """The inverse of `to_json_dict`; ValueError for anything malformed (a worker of another version)."""
        try:
            defaults = dict(data.get("sampling_defaults") or {})
            for name, value in defaults.items():
                check_knob(name, value)
            return cls(canvas_length=data["canvas_length"], max_positions=data["max_positions"],
                       sampling_defaults=defaults)
        except (KeyError, TypeError, RequestFieldError) as exc:
            raise ValueError(f"malformed model limits {dict(data)!r}: {exc}") from exc

    @staticmethod
    def most_restrictive(limits: Iterable[ModelLimits]) -> ModelLimits | None:
        """The limits every one of several workers of a queue honours (any of them may get the job): the
        smallest `max_positions`. Workers of one queue serve one checkpoint, so canvas length and defaults
        agree; should they not, the first in a stable order wins. None for no limits."""
        ordered = sorted(limits, key=lambda item: (item.max_positions, item.canvas_length))
        return ordered[0] if ordered else None


def open_ended_canvases(max_new_tokens: int, canvas_length: int) -> int:
    """Canvases an open-ended request runs at most: ceil(max_new_tokens / canvas_length)."""
    return math.ceil(max_new_tokens / canvas_length)


def check_generate_positions(prompt_tokens: int, max_new_tokens: int, limits: ModelLimits,
                             prompt_field: str = "prompt") -> int:
    """Positions an open-ended request needs (prompt + its canvases); raises naming `prompt_field` when the
    prompt with one canvas does not fit, else `max_new_tokens`. Returns the positions needed."""
    length = limits.canvas_length
    canvases = open_ended_canvases(max_new_tokens, length)
    needed = prompt_tokens + canvases * length
    if needed <= limits.max_positions:
        return needed
    room = limits.max_positions - prompt_tokens
    if room < length:
        raise RequestFieldError(prompt_field, f"{prompt_tokens} prompt tokens leave room for no canvas of "
                                f"{length} positions: the served model holds {limits.max_positions} positions "
                                "per request; shorten the prompt")
    raise RequestFieldError("max_new_tokens", f"{prompt_tokens} prompt tokens + {canvases} canvas(es) of {length} "
                            f"= {needed} positions, over the {limits.max_positions} the served model holds per "
                            f"request; at most {room // length * length} new tokens fit after this prompt")


def check_infill_positions(prompt_tokens: int, leading_tokens: int, canvases: int, limits: ModelLimits,
                           field_name: str = "document") -> int:
    """Positions an infill (edit) request needs: prompt + fixed text before its canvases + the canvases;
    raises naming `field_name` when over `max_positions`. Returns the positions needed."""
    needed = prompt_tokens + leading_tokens + canvases * limits.canvas_length
    if needed > limits.max_positions:
        raise RequestFieldError(field_name, f"{prompt_tokens} prompt tokens (instructions and the text before the "
                                f"first edit) + {leading_tokens} tokens between edits + {canvases} canvas(es) of "
                                f"{limits.canvas_length} = {needed} positions, over the {limits.max_positions} the "
                                "served model holds per request; edit a shorter excerpt of the document")
    return needed
