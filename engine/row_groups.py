"""How one step's rows are split for the forwards that pad them: encoder rows into forwards of similar length,
decoder rows into runs of similar context length for the full-attention layers. Host ints only (no torch).

Padding is computed, not skipped: one encoder forward pads every row to its widest and reads the furthest
row's past; one SDPA call over a decoder batch reads every row's past up to the longest context. A split
costs fixed work per extra forward (or per extra attention call), so rows are sorted and cut where the
padding saved outweighs it, by dynamic programming over a cost model measured on the CPU `tiny` preset
(docs/benchmarks.md, issue 9). Only the split points depend on these numbers, never the tokens: rows are
independent requests and masked keys contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

# Encoder forwards, in microseconds (fitted to 13 forwards of 1-16 rows, 1-256 tokens, contexts 0-2,000 on
# the CPU `tiny` preset, one thread): a forward costs ~14 ms before its first token; each row reads its past
# (gather, mask, attention: ~0.88 us per past position, whatever its width); each token ~43 us plus ~0.036 us
# per key it attends to.
FORWARD_US = 14_000.0
ROW_KEY_US = 0.88
TOKEN_US = 43.0
TOKEN_KEY_US = 0.036

# Decoder attention row groups, in past keys read by one row: a row-key costs ~1.3 us over tiny's two full
# layers (32 canvas queries x 4 heads), an extra group ~0.43 ms (one more gather, join and SDPA call per full
# layer), the cost of ~330 row-keys.
ATTENTION_GROUP_COST = 330


class EncodeRow(Protocol):
    """What `group_encode_rows` reads of a row (engine.scheduler.EncodeWork)."""

    @property
    def token_ids(self) -> tuple[int, ...]: ...

    @property
    def start_position(self) -> int: ...


Row = TypeVar("Row", bound=EncodeRow)


def group_encode_rows(encodes: Sequence[Row]) -> tuple[tuple[Row, ...], ...]:
    """Split one step's encode rows into groups, one encoder forward each, each padded to its own widest row.

    One forward pads every row to the widest, so a step that encodes one 256-token prompt chunk and nine
    32-token commits would compute 2,560 tokens for 544. Rows are sorted by length (longest first, so each
    group's first row is its width) and cut into contiguous runs minimising the measured cost per group,
    `FORWARD_US + rows * (past * ROW_KEY_US + width * (TOKEN_US + (past + width) * TOKEN_KEY_US))`, `past`
    being the group's furthest first position (every row reads that many past positions). O(rows^2) host
    work on at most max_canvases_in_flight rows. Groups come out longest rows first; the order does not
    change any result.
    """
    if len(encodes) <= 1:
        return (tuple(encodes),) if encodes else ()
    rows = sorted(encodes, key=lambda work: -len(work.token_ids))

    context = {}  # (start, end) -> the furthest first position of rows[start:end]
    for start in range(len(rows)):
        furthest = 0
        for end in range(start + 1, len(rows) + 1):
            furthest = max(furthest, rows[end - 1].start_position)
            context[start, end] = furthest

    def cost(start: int, end: int) -> float:
        width, past = len(rows[start].token_ids), context[start, end]
        per_row = past * ROW_KEY_US + width * (TOKEN_US + (past + width) * TOKEN_KEY_US)
        return FORWARD_US + (end - start) * per_row

    return tuple(tuple(rows[start:end]) for start, end in _cheapest_cuts(len(rows), cost))


def decoder_row_groups(context_lens: Sequence[int], canvas_length: int, block_size: int
                       ) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """Order and row groups for one decoder forward (`DiffusionGemmaModel.denoise`'s `row_groups`).

    Returns (order, groups): `order` lists the batch's rows by ascending context length (the runner runs
    the batch in that order), `groups` ((rows, bound), ...) cuts it into contiguous runs, each reading
    `bound` (its longest context) past positions in the full-attention layers, minimising
    `ATTENTION_GROUP_COST + rows * (bound rounded up to blocks + canvas_length)` per group. A batch of equal
    contexts stays one group; a batch of contexts spread over 0..2,000 splits into a few."""
    order = sorted(range(len(context_lens)), key=lambda row: context_lens[row])
    lens = [context_lens[row] for row in order]

    def keys(bound: int) -> int:
        return -(-bound // block_size) * block_size

    def cost(start: int, end: int) -> float:
        return ATTENTION_GROUP_COST + (end - start) * (keys(lens[end - 1]) + canvas_length)

    if not lens:
        return order, ()
    return order, tuple((end - start, lens[end - 1]) for start, end in _cheapest_cuts(len(lens), cost))


def _cheapest_cuts(count: int, cost: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Contiguous runs [(start, end), ...] covering 0..count that minimise the sum of cost(start, end):
    dynamic programming, O(count^2) calls."""
    best = [0.0] * (count + 1)  # best[j]: least cost of the first j rows
    cut = [0] * (count + 1)   # cut[j]: where the last run of that best split starts
    for end in range(1, count + 1):
        best[end], cut[end] = min((best[start] + cost(start, end), start) for start in range(end))
    runs, end = [], count
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return list(reversed(runs))
