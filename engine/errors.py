"""Checkpoint errors a user can act on. All subclass `dgtext.CheckpointError` (itself a ValueError), so
callers that only know the torch-free package can still catch them."""

from __future__ import annotations

from collections.abc import Sequence

from dgtext.checkpoint_files import CheckpointError

__all__ = ["CheckpointError", "CorruptShardError", "MissingCheckpointFileError", "MissingTensorsError",
           "TensorShapeError", "UnsupportedModelError"]


class MissingCheckpointFileError(CheckpointError):
    """A required file (config.json, weights, a shard named by the index) is absent."""

    def __init__(self, folder: object, filename: str, hint: str = "") -> None:
        self.filename = filename
        super().__init__(f"{folder}: {filename} is missing" + (f"; {hint}" if hint else ""))


class UnsupportedModelError(CheckpointError):
    """config.json describes a model this engine does not implement."""


class MissingTensorsError(CheckpointError):
    """The weights lack tensors the model needs; `missing` lists their checkpoint names."""

    def __init__(self, folder: object, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = ", ".join(self.missing[:20]) + (f", ... ({len(self.missing)} in all)" if len(self.missing) > 20 else "")
        super().__init__(f"{folder}: the checkpoint lacks {len(self.missing)} tensor(s) the model needs: {shown}. "
                         "The weights may be incomplete (a missing shard?) or belong to a different config.json")


class TensorShapeError(CheckpointError):
    """A tensor's stored shape differs from what config.json implies."""

    def __init__(self, name: str, expected: Sequence[int], found: Sequence[int], filename: str) -> None:
        self.name, self.expected, self.found = name, tuple(expected), tuple(found)
        super().__init__(f"{filename}: tensor {name} has shape {list(found)} but config.json implies "
                         f"{list(expected)}; the weights and config.json do not belong together")


class CorruptShardError(CheckpointError):
    """A weights file cannot be read (truncated download, not safetensors, bad header)."""

    def __init__(self, filename: str, reason: str) -> None:
        self.filename = filename
        super().__init__(f"weights file {filename} is corrupt or truncated ({reason}); delete it and download "
                         "the checkpoint again")
