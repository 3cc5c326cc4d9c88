"""Resolve a model reference (local folder or Hugging Face repo id) to a local folder."""

from __future__ import annotations

import re
from pathlib import Path

# Files a text-only serving process needs: configs, tokenizer, chat template, weights. The hub download
# skips everything else (vision processor files, GGUF, ...).
SERVING_FILE_PATTERNS = ["*.json", "*.safetensors", "chat_template.jinja"]
TOKENIZER_FILE_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                           "generation_config.json", "config.json", "special_tokens_map.json"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says what to fix."""


def resolve_model_dir(model: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding `model`'s files.

    A path that exists locally is returned as is (it must be a folder). Anything else must look like a
    Hugging Face repo id (`org/name`) and is fetched with `huggingface_hub.snapshot_download`, restricted to
    `allow_patterns` (default: the serving files), which honours HF_HOME and HF_HUB_OFFLINE.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path {str(path)!r} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise CheckpointError(f"model folder {text!r} does not exist (and it is not a Hugging Face repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=text, allow_patterns=allow_patterns or SERVING_FILE_PATTERNS)
    except Exception as exc:  # hub raises many types; the user needs one actionable message
        raise CheckpointError(
            f"could not fetch model {text!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the repo id, network access, HF_TOKEN for gated repos, or set HF_HUB_OFFLINE=1 with a "
            "populated HF_HOME cache"
        ) from exc
    return Path(local)
