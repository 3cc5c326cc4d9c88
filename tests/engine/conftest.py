"""Engine test fixtures: tiny checkpoints written once per session (ours and the transformers reference's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.checkpoints import save_reference_checkpoint, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random `tiny`-preset checkpoint written by engine.checkpoint (byte tokenizer, chat template)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=0)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny reference model saved by `transformers` `save_pretrained` as one safetensors file."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("reference_single"), seed=0)


@pytest.fixture(scope="session")
def reference_sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model saved in several shards with `model.safetensors.index.json`."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("reference_sharded"), seed=1, max_shard_size="100KB")
