"""Per-API-key limits (`DGSERVE_KEY_LIMITS`): how many unfinished jobs a key may hold and how many tokens it
may submit per minute.

Format (one line an operator can read; entries separated by `;`, limits by `,`):

    DGSERVE_KEY_LIMITS="*=queued:200,tpm:400000; key-alice-0001=queued:20; sha256:<64 hex>=tpm:50000"

- The part before `=` names the key as `DGSERVE_API_KEYS` does: the key itself or `sha256:<hex>` of it (only
  the hash is kept). `*` is the default for every key without an entry of its own, and for all anonymous
  callers together when auth is off.
- `queued:N`: at most N of the key's interactive jobs unfinished (queued or running) at once.
- `tpm:N`: at most N tokens submitted per minute (fixed one-minute windows), counted at submit as the
  prompt's tokens (with the model's tokenizer, as for `max_prompt_tokens`) plus the generation budget asked
  for (`max_new_tokens`, or the model's default; for an edit, each span's `max_tokens` or the default).
  That is what can be enforced before the job runs; a job that stops early is still charged its budget.
- A limit left out of an entry is unlimited for that key (an own entry replaces `*`, it does not merge).

Batch API lines are exempt (the batch was admitted whole under `DGSERVE_MAX_BATCH_LINES`; its lines run only
when no interactive job waits, and fairly against other keys' lines): see docs/operations.md.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from services.settings import KEY_HASH_PREFIX, hash_api_key

DEFAULT_ENTRY = "*"
_LIMIT_NAMES = {"queued": "max_queued_jobs", "tpm": "tokens_per_minute"}


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; None = unlimited."""

    max_queued_jobs: int | None = None
    tokens_per_minute: int | None = None


UNLIMITED = KeyLimits()


class KeyLimitTable:
    """Limits per owner id (the key's sha256 hex, '' for anonymous callers), parsed once."""

    def __init__(self, by_owner: dict[str, KeyLimits], default: KeyLimits):
        self.by_owner = by_owner
        self.default = default

    def for_owner(self, owner: str) -> KeyLimits:
        return self.by_owner.get(owner, self.default)

    @property
    def empty(self) -> bool:
        return not self.by_owner and self.default == UNLIMITED


@functools.lru_cache(maxsize=8)
def parse_key_limits(text: str) -> KeyLimitTable:
    """Parse the `DGSERVE_KEY_LIMITS` format (module docstring); ValueError naming the bad entry."""
    by_owner: dict[str, KeyLimits] = {}
    default = UNLIMITED
    for raw_entry in text.split(";"):
        entry = raw_entry.strip()
        if not entry:
            continue
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"key_limits: entry {_shown(entry)} must look like <key>=queued:N,tpm:M")
        limits = _parse_spec(name, spec)
        if name == DEFAULT_ENTRY:
            default = limits
        else:
            by_owner[_owner_of(name)] = limits
    return KeyLimitTable(by_owner, default)


def _parse_spec(name: str, spec: str) -> KeyLimits:
    values: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        match = re.fullmatch(r"([a-z]+)\s*:\s*(\d+)", part)
        if match is None or match.group(1) not in _LIMIT_NAMES:
            raise ValueError(f"key_limits: {_shown(name)} has {part!r}; expected queued:N or tpm:N "
                             f"(N a whole number >= 1)")
        value = int(match.group(2))
        if value < 1:
            raise ValueError(f"key_limits: {_shown(name)} has {part!r}; a limit must be at least 1 "
                             f"(leave it out for unlimited)")
        values[_LIMIT_NAMES[match.group(1)]] = value
    return KeyLimits(**values)


def _owner_of(name: str) -> str:
    if name.startswith(KEY_HASH_PREFIX):
        digest = name[len(KEY_HASH_PREFIX):].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("key_limits: a sha256: entry must be followed by 64 hex digits")
        return digest
    return hash_api_key(name)


def _shown(name: str) -> str:
    """An entry's name for an error message: hashes and `*` as they are, a plaintext key shortened."""
    if name == DEFAULT_ENTRY or name.startswith(KEY_HASH_PREFIX):
        return repr(name)
    return repr(name[:4] + "…") if len(name) > 4 else repr(name)
