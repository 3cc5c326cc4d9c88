"""Byte-level BPE for the small model, with the released model's special-token layout.

Ids 0..106 are the specials of `dgtext.byte_tokenizer.special_token_layout()` (pad 0, eos 1, bos 2,
unk 3, `<mask>` 4, `<|tool_response>` 50, `<|turn>` 105, `<turn|>` 106), then the 256 byte symbols,
then learned merges up to `vocab_size`. Every string round-trips (byte-level), so no text is ever unk.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgtext.byte_tokenizer import MIN_VOCAB_SIZE, special_token_layout


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train on `texts` and return a tokenizer of exactly `vocab_size` ids (fewer only if the corpus
    runs out of merges). The GPT-2 split regex keeps merges inside words, number runs and
    whitespace runs, so indentation becomes a handful of whitespace tokens."""
    if vocab_size < MIN_VOCAB_SIZE + 1:
        raise ValueError(f"vocab_size must exceed {MIN_VOCAB_SIZE} (107 specials + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_token_layout(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
