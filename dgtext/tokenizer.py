"""The prompt tokenizer: a checkpoint's `tokenizer.json`, its chat template and its stop ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .checkpoint_files import CheckpointError

_ROLES = ("system", "user", "assistant", "model")


class PromptTokenizer:
    """Turns a raw prompt or chat messages into token ids, and ids back into text.

    Contract: exactly one of `prompt` / `messages`; chat messages are rendered with the checkpoint's
    own template in a sandboxed Jinja environment (a template cannot touch Python internals).
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, eos_ids: Sequence[int],
                 pad_id: int, bos_token: str | None) -> None:
        self._tokenizer = tokenizer
        # User text (raw prompts, documents) must never turn into control tokens: a document that contains
        # the string "<eos>" is text. This twin encodes special-token strings as ordinary bytes.
        self._plain_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._plain_tokenizer.encode_special_tokens = True
        self._template = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
            self._template = env.from_string(chat_template)
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        self.pad_id = pad_id
        self.bos_token = bos_token
        self.bos_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load from a checkpoint folder (tokenizer.json; chat_template.jinja or tokenizer_config.json's
        chat_template; stop and pad ids from generation_config.json, else config.json)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{folder}: tokenizer.json is missing; the checkpoint folder must contain it")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise CheckpointError(f"{tok_file}: not a valid tokenizers file ({exc})") from exc
        tok_config = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"
        chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        if chat_template is None and isinstance(tok_config.get("chat_template"), str):
            chat_template = tok_config["chat_template"]
        gen = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")
        text_config = model_config.get("text_config", model_config)
        eos = gen.get("eos_token_id", text_config.get("eos_token_id", 1))
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad_id = gen.get("pad_token_id", text_config.get("pad_token_id", 0))
        bos_token = tok_config.get("bos_token") if isinstance(tok_config.get("bos_token"), str) else None
        if bos_token is None and tokenizer.token_to_id("<bos>") is not None:
            bos_token = "<bos>"
        return cls(tokenizer, chat_template, eos_ids, int(pad_id if pad_id is not None else 0), bos_token)

    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings inside `text` stay plain text unless `parse_special`
        (used for the output of the chat template, whose markers must become control tokens)."""
        tokenizer = self._tokenizer if parse_special else self._plain_tokenizer
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the checkpoint's template (ValueError on malformed messages)."""
        if self._template is None:
            raise ValueError("messages: this model has no chat template; send a raw `prompt` instead")
        _validate_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token="")
        except TemplateError as exc:
            raise ValueError(f"messages: the chat template could not render them ({exc})") from exc

    def encode_prompt(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a raw prompt (bos prepended when the tokenizer has one) or of chat messages."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if messages is not None:
            return self.encode(self.render_chat(messages), parse_special=True)
        ids = self.encode(prompt or "")
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids


def _validate_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: must be an object with `role` and `content`")
        if message.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {', '.join(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content: must be a string")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}
