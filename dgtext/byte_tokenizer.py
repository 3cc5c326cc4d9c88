"""A byte-level tokenizer with the special-token layout of the released DiffusionGemma tokenizer.

Used for random-weight checkpoints (tests, the embedded default before a trained model exists) and as
the special-token layout the small trained model's BPE tokenizer follows. Ids 0..106 are special:
pad 0, eos 1, bos 2, unk 3, `<mask>` 4, `<|tool_response>` 50, `<|turn>` 105, `<turn|>` 106, and
reserved `<unused_k>` fillers elsewhere; the 256 byte tokens follow from id 107.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
TURN_OPEN, TURN_CLOSE, TOOL_RESPONSE = "<|turn>", "<turn|>", "<|tool_response>"
_FIXED_SPECIALS = {0: PAD, 1: EOS, 2: BOS, 3: UNK, 4: MASK, 50: TOOL_RESPONSE, 105: TURN_OPEN, 106: TURN_CLOSE}
NUM_SPECIAL_IDS = 107
BYTE_TOKENS_START = NUM_SPECIAL_IDS
MIN_VOCAB_SIZE = NUM_SPECIAL_IDS + 256

# Gemma-4 style turns: <bos><|turn>user\n{text}<turn|>\n<|turn>model\n
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# generation_config.json stop ids for this layout: eos and the end-of-turn marker.
DEFAULT_EOS_IDS = (1, 106)


def special_token_layout() -> list[str]:
    """The 107 special tokens in id order (fillers named `<unused_k>`), e.g. for a BPE trainer's
    `special_tokens` so that trained tokenizers keep the real model's ids."""
    return [_FIXED_SPECIALS.get(i, f"<unused_{i}>") for i in range(NUM_SPECIAL_IDS)]


def build_byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer of exactly `vocab_size` ids (no merges): specials, 256 bytes, then
    `<unused_k>` specials up to `vocab_size`. Every string round-trips through encode/decode."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for the byte tokenizer, got {vocab_size}")
    specials = special_token_layout()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for offset, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = BYTE_TOKENS_START + offset
    tail = [f"<unused_{i}>" for i in range(MIN_VOCAB_SIZE, vocab_size)]
    for i, tok in enumerate(tail):
        vocab[tok] = MIN_VOCAB_SIZE + i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials + tail])
    return tokenizer
