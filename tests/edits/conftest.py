"""Tokenizers for the edit tests: the byte tokenizer of random checkpoints and a small trained BPE whose
merges make tokens straddle span edges (both loaded through the real PromptTokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgtext.byte_tokenizer import build_byte_tokenizer, special_token_layout
from dgtext.save_tokenizer import save_tokenizer_files
from dgtext.tokenizer import PromptTokenizer

# Text the BPE is trained on: prose, code, CRLF, tabs and non-Latin scripts, so that merges exist for all.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.\r\nPack my box with five dozen liquor jugs.\n",
    "def add(a, b):\n\treturn a + b\n\nclass Canvas:\n    def __init__(self, length):\n        self.length = length\n",
    "Caf\u00e9 cre\u0300me, na\u00efve r\u00e9sum\u00e9. \U0001f600\U0001f469\u200d\U0001f4bb \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627\n",
    "for (int i = 0; i < n; ++i) { total += values[i]; }\r\n// comment\t\ttabs\n",
]


def _save_and_load(tokenizer: Tokenizer, folder: Path) -> PromptTokenizer:
    save_tokenizer_files(tokenizer, folder)
    return PromptTokenizer.from_dir(folder)


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    return _save_and_load(build_byte_tokenizer(512), tmp_path_factory.mktemp("byte_tok"))


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=special_token_layout(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer=trainer)
    return _save_and_load(tokenizer, tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(params=["byte", "bpe"])
def any_tokenizer(request: pytest.FixtureRequest) -> PromptTokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")
