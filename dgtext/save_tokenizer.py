"""Write a tokenizer and its chat template into a checkpoint folder in the released file layout."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .byte_tokenizer import BOS, DEFAULT_CHAT_TEMPLATE, EOS, MASK, PAD, UNK


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path, chat_template: str = DEFAULT_CHAT_TEMPLATE) -> None:
    """Write `tokenizer.json`, `chat_template.jinja` and a `tokenizer_config.json` naming the special tokens."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": MASK,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
