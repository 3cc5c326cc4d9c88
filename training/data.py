"""Training examples: a clean prompt window followed by one corrupted canvas (docs/training.md), plus edit-shaped examples where only one contiguous span of the
canvas is corrupted and the rest of the canvas stays clean (what edit and infill jobs present).

Shape legend: B examples, P longest prompt in the batch, C canvas length, L = P + C.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

NOISE_FLOOR = 1e-3  # t ~ U(NOISE_FLOOR, 1): never a perfectly clean "full" example


@dataclass(frozen=True)
class DataLayout:
    """Everything the sampler needs to know about the model; ids come from the model config."""

    canvas_length: int
    max_prompt_tokens: int
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    span_fraction: float = 0.5  # share of edit-shaped (span-noised) examples
    # Of the span examples, this share corrupts one whole source line entirely (every token strictly between
    # two line-break tokens of the canvas): what a line infill or a one-line edit presents at its first step.
    line_span_fraction: float = 0.0
    line_break_ids: frozenset[int] = frozenset()  # ids whose text contains a newline

    def __post_init__(self) -> None:
        if self.canvas_length < 2 or self.max_prompt_tokens < 1:
            raise ValueError("canvas_length must be >= 2 and max_prompt_tokens >= 1")
        for name in ("span_fraction", "line_span_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.line_span_fraction > 0 and not self.line_break_ids:
            raise ValueError("line_span_fraction > 0 needs line_break_ids")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] prompt then clean canvas, right-padded with pad_id
    token_valid: torch.Tensor  # [B, L] False on right padding
    positions: torch.Tensor  # [B, L] 0..P_i+C-1 (0 on padding)
    lm_targets: torch.Tensor  # [B, L] next token, -100 where there is none or it is pad
    prompt_lens: torch.Tensor  # [B]
    canvas_clean: torch.Tensor  # [B, C] targets of the denoiser
    canvas_noisy: torch.Tensor  # [B, C] denoiser input
    canvas_positions: torch.Tensor  # [B, C] P_i .. P_i+C-1


def line_break_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids whose decoded text contains a newline (byte-level BPE merges newlines with indentation)."""
    return frozenset(i for i in range(tokenizer.get_vocab_size()) if "\n" in tokenizer.decode([i]))


def encode_streams(tokenizer: Tokenizer, texts: Sequence[str], layout: DataLayout) -> list[torch.Tensor]:
    """One id stream per file: bos, the file's tokens, eos (files start like a fresh prompt)."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [torch.tensor([layout.bos_id, *enc.ids, layout.eos_id], dtype=torch.long) for enc in encodings]


class ExampleSampler:
    """Draws batches of windows from the streams, files weighted by their token count."""

    def __init__(self, streams: Sequence[torch.Tensor], layout: DataLayout, seed: int) -> None:
        if not streams:
            raise ValueError("no token streams to sample from (empty corpus split?)")
        self.streams = [s for s in streams if len(s) >= 2]
        self.layout = layout
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.tensor([float(len(s) - 1) for s in self.streams])

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids, clean canvas ids [C]); the canvas is padded with pad after the stream's eos."""
        c = self.layout.canvas_length
        stream = self.streams[int(torch.multinomial(self.weights, 1, generator=self.generator))]
        start = self._randint(1, len(stream) - 1)
        prompt_len = min(self._randint(1, self.layout.max_prompt_tokens), start)
        canvas = torch.full((c,), self.layout.pad_id, dtype=torch.long)
        piece = stream[start:start + c]
        canvas[: len(piece)] = piece
        return stream[start - prompt_len:start], canvas

    def _line_span(self, canvas: torch.Tensor) -> torch.Tensor | None:
        """[C] True on every token of one whole line of the canvas, or None if the canvas holds none."""
        breaks = [i for i, token in enumerate(canvas.tolist()) if token in self.layout.line_break_ids]
        lines = [(a + 1, b) for a, b in zip(breaks, breaks[1:], strict=False) if b - a >= 2]
        if not lines:
            return None
        start, end = lines[self._randint(0, len(lines) - 1)]
        mask = torch.zeros(len(canvas), dtype=torch.bool)
        mask[start:end] = True
        return mask

    def _noise_mask(self, span_example: bool, canvas: torch.Tensor) -> torch.Tensor:
        """[C] True where the canvas is corrupted: all positions (full examples), one whole line, or one span."""
        c = self.layout.canvas_length
        if span_example and float(torch.rand((), generator=self.generator)) < self.layout.line_span_fraction:
            line = self._line_span(canvas)
            if line is not None:
                return line
        t = NOISE_FLOOR + (1 - NOISE_FLOOR) * float(torch.rand((), generator=self.generator))
        allowed = torch.ones(c, dtype=torch.bool)
        if span_example:
            span_len = self._randint(1, c - 1)
            # Half the spans start the canvas (infill of text right after the cache), half sit inside it.
            span_start = 0 if self._randint(0, 1) == 0 else self._randint(0, c - span_len)
            allowed = torch.zeros(c, dtype=torch.bool)
            allowed[span_start:span_start + span_len] = True
        return allowed & (torch.rand(c, generator=self.generator) < t)

    def sample(self, batch_size: int) -> Batch:
        layout, c = self.layout, self.layout.canvas_length
        windows = [self._window() for _ in range(batch_size)]
        prompt_lens = torch.tensor([len(p) for p, _ in windows])
        width = int(prompt_lens.max()) + c
        input_ids = torch.full((batch_size, width), layout.pad_id, dtype=torch.long)
        token_valid = torch.zeros((batch_size, width), dtype=torch.bool)
        canvas_clean = torch.stack([canvas for _, canvas in windows])
        for row, (prompt, canvas) in enumerate(windows):
            n = len(prompt)
            input_ids[row, :n] = prompt
            input_ids[row, n:n + c] = canvas
            token_valid[row, :n + c] = True
        positions = torch.where(token_valid, torch.arange(width).expand(batch_size, width), 0)
        lm_targets = torch.full_like(input_ids, -100)
        next_ids = input_ids[:, 1:]
        has_target = token_valid[:, 1:] & (next_ids != layout.pad_id)
        lm_targets[:, :-1] = torch.where(has_target, next_ids, -100)
        span_rows = torch.rand(batch_size, generator=self.generator) < layout.span_fraction
        noise = torch.stack([self._noise_mask(bool(is_span), canvas)
                             for is_span, canvas in zip(span_rows, canvas_clean, strict=True)])
        random_ids = torch.randint(0, layout.vocab_size, (batch_size, c), generator=self.generator)
        return Batch(
            input_ids=input_ids, token_valid=token_valid, positions=positions, lm_targets=lm_targets,
            prompt_lens=prompt_lens, canvas_clean=canvas_clean,
            canvas_noisy=torch.where(noise, random_ids, canvas_clean),
            canvas_positions=prompt_lens[:, None] + torch.arange(c)[None, :],
        )
