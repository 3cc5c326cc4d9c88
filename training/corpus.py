"""The training corpus: the Python standard library's own ``.py`` files, found at run time.

Nothing of the corpus is committed. The split is by file and deterministic: a file is held out when
the SHA-256 of its path relative to the stdlib root falls in the held-out bucket, so every machine
with the same Python version gets the same split, and adding a file never moves another one.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Third-party code and the stdlib's own test suites are left out: the first is not the stdlib,
# the second is mostly data-shaped noise (huge literal tables, deliberately broken syntax).
# `pydoc_data` is one generated string of documentation prose (7% of the remaining characters).
EXCLUDED_DIR_NAMES = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                                "pydoc_data"})
# The generated charmap codecs under `encodings/` (cp1252.py, mac_roman.py, ...) are 256-entry literal
# tables, another 12% of the characters: data, not code. They announce themselves in their docstring.
GENERATED_TABLE_MARKER = "Python Character Mapping Codec"
HELD_OUT_BUCKETS = 10  # one bucket in ten is held out (about 10% of files)


@dataclass(frozen=True)
class SourceFile:
    relative_path: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    """True when the file belongs to the held-out split (a pure function of the relative path)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def _candidate_paths(root: Path) -> list[Path]:
    paths = []
    for path in root.rglob("*.py"):
        relative_dirs = path.relative_to(root).parts[:-1]
        if not EXCLUDED_DIR_NAMES.intersection(relative_dirs):
            paths.append(path)
    return sorted(paths)


def load_split(split: str, root: Path | None = None) -> list[SourceFile]:
    """Return the files of ``split`` ("train" or "heldout"), sorted by relative path.

    Files that are not valid UTF-8 are skipped (a handful of encoding fixtures), and so are generated
    codec tables (GENERATED_TABLE_MARKER near the top)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    want_held_out = split == "heldout"
    files = []
    for path in _candidate_paths(root):
        relative_path = path.relative_to(root).as_posix()
        if is_held_out(relative_path) != want_held_out:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and GENERATED_TABLE_MARKER not in text[:300]:
            files.append(SourceFile(relative_path, text))
    return files
