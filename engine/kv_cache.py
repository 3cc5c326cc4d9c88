"""Block-paged KV cache shared by the encoder (writes) and the decoder (reads).

Storage is a pool of fixed-size blocks of `block_size` positions per layer kind, allocated once:
full-attention layers draw from the full pool, sliding layers from a (much smaller) sliding pool, because a
sliding layer only ever needs the blocks within its window. Each layer's K and V live in one flat tensor
`[(num_blocks + 1) * block_size, G, hd]`; the extra last block is a scratch block that padding tokens are
written to (and that padded table entries point at), so reads and writes need no data-dependent branching.
It is never visible through a mask.

Which physical blocks a row reads and writes is given by its `BlockTables` (host bookkeeping lives in
`engine/block_manager.py`): the full table maps logical block i (positions i*bs .. i*bs+bs-1) to a physical
block; the sliding table maps logical block `sliding_first + j` to a physical block, covering only the
window around the row's context end. Reads gather K/V through the table into `[B, S, G, hd]` and masks are
built from the gathered keys' absolute positions, so any table entry outside the row's visible positions
(scratch, released blocks) is masked out. Every shape depends only on the table widths and host ints (static
per batch bucket), never on tensor values: no host syncs on the read path (docs/architecture.md, "KV cache").

`KVCache` is the slot-addressed form kept for training and tests: each slot owns a fixed run of blocks in
both pools, and its tables are computed on the device from the slot ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL, SLIDING, ModelConfig

# Shapes: B rows, T new tokens per row, S gathered keys, Nf / Ns table widths (blocks), bs block size,
# G kv heads, hd head dim, N blocks in a pool.

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class BlockTables:
    """Per-row block tables of one forward (int64 device tensors).

    full [B, Nf]: physical full-pool block of logical blocks 0..Nf-1 (padding: the scratch block); it must
        cover every position the forward reads or writes.
    sliding [B, Ns]: physical sliding-pool block of logical blocks sliding_first[b] + j; it must cover the
        row's window before its context end and every position the forward writes.
    sliding_first [B]: the first logical block of `sliding`.
    """

    full: torch.Tensor
    sliding: torch.Tensor
    sliding_first: torch.Tensor

    @property
    def rows(self) -> int:
        return self.full.shape[0]


@dataclass(frozen=True)
class ForwardIndex:
    """Flat storage rows of one forward, per layer kind: `read` [B, S] (gathered past keys), `key_positions`
    [B or 1, S] (their absolute positions, for the masks) and `write` [B, T] (new tokens; padding -> scratch)."""

    read: dict[str, torch.Tensor]
    key_positions: dict[str, torch.Tensor]
    write: dict[str, torch.Tensor]


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks needed to hold `positions` positions."""
    return -(-positions // block_size)


class PagedKVCache:
    """Allocated once: `num_full_blocks` + 1 scratch blocks per full layer, `num_sliding_blocks` + 1 per
    sliding layer. Block ids are plain ints owned by the block manager."""

    def __init__(self, config: ModelConfig, num_full_blocks: int, num_sliding_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_context: int | None = None) -> None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_full_blocks < 1 or num_sliding_blocks < 0:
            raise ValueError(f"PagedKVCache needs at least one full block, got {num_full_blocks}")
        self.config, self.block_size, self.window = config, block_size, config.sliding_window
        self.num_blocks = {FULL: num_full_blocks, SLIDING: num_sliding_blocks}
        self.scratch = {FULL: num_full_blocks, SLIDING: num_sliding_blocks}
        self.max_context = max_context if max_context is not None else num_full_blocks * block_size
        self.device, self.dtype = torch.device(device), dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer_idx, kind in enumerate(config.layer_types):
            shape = ((self.num_blocks[kind] + 1) * block_size, config.layer_kv_heads(layer_idx),
                     config.layer_head_dim(layer_idx))
            self.keys.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=self.device, dtype=dtype))

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> dict[str, int]:
        """Device bytes of one block (K and V of every layer of the kind), per layer kind."""
        elem = torch.empty(0, dtype=dtype).element_size()
        total = {FULL: 0, SLIDING: 0}
        for layer_idx, kind in enumerate(config.layer_types):
            total[kind] += 2 * block_size * config.layer_kv_heads(layer_idx) * config.layer_head_dim(layer_idx) * elem
        return total

    @staticmethod
    def sliding_read_blocks(window: int, block_size: int) -> int:
        """Sliding blocks a row can see before its context end: the last `window - 1` positions span at most
        this many blocks, wherever the context ends."""
        return blocks_for(window - 1, block_size) + 1

    def tables(self, slots: torch.Tensor | BlockTables, context_start: torch.Tensor) -> BlockTables:
        """The block tables of a forward; the paged cache takes them as given (the runner built them)."""
        if not isinstance(slots, BlockTables):
            raise TypeError("a PagedKVCache is addressed by BlockTables, not slot ids")
        return slots

    def forward_index(self, tables: BlockTables, positions: torch.Tensor, token_valid: torch.Tensor | None,
                      context_bound: int) -> ForwardIndex:
        """Storage rows for one forward whose rows write `positions` [B, T] (None valid = a decoder forward,
        which writes nothing) and read at most `context_bound` past positions (host int)."""
        bs, device = self.block_size, positions.device
        offsets = torch.arange(bs, device=device)
        cap = blocks_for(context_bound, bs)
        read_blocks = {FULL: min(tables.full.shape[1], cap),
                       SLIDING: min(tables.sliding.shape[1], cap, self.sliding_read_blocks(self.window, bs))}
        table_of = {FULL: tables.full, SLIDING: tables.sliding}
        first = {FULL: torch.zeros_like(tables.sliding_first), SLIDING: tables.sliding_first}
        read, key_positions, write = {}, {}, {}
        for kind in set(self.config.layer_types):
            table, count = table_of[kind], read_blocks[kind]
            read[kind] = (table[:, :count, None] * bs + offsets).reshape(table.shape[0], count * bs)
            logical = first[kind][:, None] + torch.arange(count, device=device)[None, :]          # [B, count]
            key_positions[kind] = (logical[:, :, None] * bs + offsets).reshape(table.shape[0], count * bs)
            if token_valid is not None:
                column = torch.where(token_valid, positions // bs - first[kind][:, None], 0)
                column = column.clamp(0, table.shape[1] - 1)
                block = torch.where(token_valid, table.gather(1, column), self.scratch[kind])
                write[kind] = block * bs + positions % bs
        return ForwardIndex(read=read, key_positions=key_positions, write=write)

    def read(self, layer_idx: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at storage `rows` [B, S] -> [B, S, G, hd] each (a gather: one copy, no host reads)."""
        flat = rows.reshape(-1)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        shape = (*rows.shape, *keys.shape[1:])
        return keys.index_select(0, flat).view(shape), values.index_select(0, flat).view(shape)

    def write(self, layer_idx: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new k, v [B, T, G, hd] at storage `rows` [B, T] (from `forward_index`)."""
        flat = rows.reshape(-1)
        self.keys[layer_idx].index_put_((flat,), k.reshape(flat.shape[0], *k.shape[2:]).to(self.dtype))
        self.values[layer_idx].index_put_((flat,), v.reshape(flat.shape[0], *v.shape[2:]).to(self.dtype))


class KVCache(PagedKVCache):
    """Slot-addressed paged cache (training, tests): slot s owns blocks s*n .. s*n+n-1 of both pools, n =
    blocks of `max_context`. Forwards take slot ids [B]; the tables are derived on the device."""

    def __init__(self, config: ModelConfig, num_slots: int, max_context: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_slots < 1 or max_context < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_context >= 1, got {num_slots}, {max_context}")
        self.num_slots, self.blocks_per_slot = num_slots, blocks_for(max_context, block_size)
        total = num_slots * self.blocks_per_slot
        super().__init__(config, total, total, block_size, device, dtype, max_context=max_context)

    def tables(self, slots: torch.Tensor | BlockTables, context_start: torch.Tensor) -> BlockTables:
        if isinstance(slots, BlockTables):
            return slots
        per_slot = self.blocks_per_slot
        own = torch.arange(per_slot, device=slots.device)[None, :]                               # [1, n]
        base = slots[:, None] * per_slot                                                         # [B, 1]
        first = torch.div(context_start - self.window + 1, self.block_size, rounding_mode="floor").clamp(min=0)
        sliding_logical = first[:, None] + own
        sliding = torch.where(sliding_logical < per_slot, base + sliding_logical, self.scratch[SLIDING])
        return BlockTables(full=base + own, sliding=sliding, sliding_first=first)

    def reset_slot(self, slot: int) -> None:
        """Kept for callers that reuse a slot: masks hide every position a new request has not written, so
        nothing needs clearing."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")


__all__ = ["DEFAULT_BLOCK_SIZE", "BlockTables", "ForwardIndex", "KVCache", "PagedKVCache", "blocks_for",
           "check_block_size"]
