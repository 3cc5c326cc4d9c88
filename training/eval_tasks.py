"""Held-out evaluation tasks for the small model, and the frequency baselines they are compared with.

(a) single-line infill: one source line is masked with context on both sides. The prompt is the text
    before it (last `max_prompt_tokens` tokens); the canvas holds the line's tokens (free) followed by
    the text after it (fixed). A token belongs to the line when it lies wholly inside the line's
    characters, so the surrounding tokens keep the exact tokenization of the whole file (the
    newline+indent token before the line stays fixed context).
(b) generation: complete held-out top-level function signatures; a completion counts when
    `signature + completion`, trimmed to its last complete line, parses with `ast`.
"""

from __future__ import annotations

import ast
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from .corpus import SourceFile

MIN_LINE_TOKENS = 2


@dataclass(frozen=True)
class InfillItem:
    source: str  # "relative/path.py:line"
    prompt_ids: tuple[int, ...]
    canvas_ids: tuple[int, ...]  # canvas_length ids: target line, then the following text (pad after eos)
    is_fixed: tuple[bool, ...]
    num_free: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.canvas_ids[: self.num_free]


@dataclass(frozen=True)
class InfillScore:
    exact_lines: int
    lines: int
    correct_tokens: int
    tokens: int

    @property
    def exact_match(self) -> float:
        return self.exact_lines / max(self.lines, 1)

    @property
    def token_accuracy(self) -> float:
        return self.correct_tokens / max(self.tokens, 1)


def _line_token_spans(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(line number, first token index, end token index) of the tokens lying wholly inside each line."""
    spans, token = [], 0
    line_start = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        line_end = line_start + len(line)
        while token < len(offsets) and offsets[token][0] < line_start:
            token += 1
        first = token
        while token < len(offsets) and offsets[token][1] <= line_end and offsets[token][0] >= line_start:
            token += 1
        if token > first:
            spans.append((line_no, first, token))
        line_start = line_end + 1
    return spans


def infill_items(tokenizer: Tokenizer, files: Sequence[SourceFile], *, canvas_length: int,
                 max_prompt_tokens: int, count: int, seed: int, bos_id: int, eos_id: int,
                 pad_id: int) -> list[InfillItem]:
    """`count` infill items drawn deterministically (by `seed`) from every eligible line of `files`.

    Eligible: at least MIN_LINE_TOKENS tokens and at most half the canvas, so that the canvas always
    holds text after the line."""
    candidates = []
    for source in files:
        enc = tokenizer.encode(source.text, add_special_tokens=False)
        stream = [bos_id, *enc.ids, eos_id]
        for line_no, first, end in _line_token_spans(source.text, enc.offsets):
            if MIN_LINE_TOKENS <= end - first <= canvas_length // 2:
                candidates.append((source.relative_path, line_no, stream, first + 1, end + 1))
    picked = random.Random(seed).sample(candidates, min(count, len(candidates)))
    items = []
    for path, line_no, stream, first, end in picked:
        canvas = stream[first:first + canvas_length]
        canvas = canvas + [pad_id] * (canvas_length - len(canvas))
        num_free = end - first
        items.append(InfillItem(
            source=f"{path}:{line_no}", prompt_ids=tuple(stream[max(0, first - max_prompt_tokens):first]),
            canvas_ids=tuple(canvas), is_fixed=tuple(i >= num_free for i in range(canvas_length)),
            num_free=num_free))
    return items


def score_infill(items: Sequence[InfillItem], predictions: Sequence[Sequence[int]]) -> InfillScore:
    """Exact-line match (all free tokens right) and pooled token accuracy over the free positions."""
    exact = correct = total = 0
    for item, predicted in zip(items, predictions, strict=True):
        hits = sum(int(p == t) for p, t in zip(predicted, item.target_ids, strict=False))
        exact += int(hits == item.num_free and len(predicted) >= item.num_free)
        correct += hits
        total += item.num_free
    return InfillScore(exact, len(items), correct, total)


def function_signatures(files: Sequence[SourceFile], count: int, seed: int) -> list[str]:
    """`count` one-line top-level `def` signatures (without trailing newline), drawn by `seed`."""
    signatures = []
    for source in files:
        try:
            tree = ast.parse(source.text)
        except SyntaxError:
            continue
        lines = source.text.split("\n")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
                line = lines[node.lineno - 1].rstrip()
                if line.startswith(("def ", "async def ")) and line.endswith(":"):
                    signatures.append(line)
    return random.Random(seed).sample(signatures, min(count, len(signatures)))


def disjoint_signatures(files: Sequence[SourceFile], count: int, seed: int, excluded: Sequence[str]) -> list[str]:
    """`count` signatures drawn by `seed`, none of them in `excluded` (a tuning draw kept apart from the
    evaluation's)."""
    excluded_set = set(excluded)
    return [s for s in function_signatures(files, 1 << 30, seed) if s not in excluded_set][:count]


def completion_parses(signature: str, completion: str, stopped: bool) -> bool:
    """True when signature + completion parses. A completion cut by the length limit is trimmed to
    its last complete line first (a stopped one is complete as it is)."""
    text = signature + completion
    if not stopped and "\n" in completion:
        text = text[: text.rindex("\n")]
    elif not stopped:
        return False
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


class FrequencyBaseline:
    """Counts from the training split: token unigram frequencies and, per token count, the most
    frequent line (as token ids) under the same line/token rule as the infill task."""

    def __init__(self, tokenizer: Tokenizer, files: Sequence[SourceFile], excluded_ids: Sequence[int]) -> None:
        token_counts: Counter[int] = Counter()
        lines_by_length: dict[int, Counter[tuple[int, ...]]] = defaultdict(Counter)
        encodings = tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)
        for source, enc in zip(files, encodings, strict=True):
            token_counts.update(enc.ids)
            for _, first, end in _line_token_spans(source.text, enc.offsets):
                lines_by_length[end - first][tuple(enc.ids[first:end])] += 1
        for token_id in excluded_ids:
            token_counts.pop(token_id, None)
        self.token_counts = token_counts
        self.most_frequent_token = token_counts.most_common(1)[0][0]
        self.line_by_length = {n: c.most_common(1)[0][0] for n, c in lines_by_length.items()}

    def predict_line(self, num_tokens: int) -> list[int]:
        """The most frequent training line of exactly this many tokens (else the top token repeated)."""
        return list(self.line_by_length.get(num_tokens, (self.most_frequent_token,) * num_tokens))

    def sample_tokens(self, count: int, rng: random.Random) -> list[int]:
        """`count` tokens drawn independently from the unigram distribution (a zero-context LM)."""
        ids, weights = zip(*self.token_counts.items(), strict=True)
        return rng.choices(ids, weights=weights, k=count)
