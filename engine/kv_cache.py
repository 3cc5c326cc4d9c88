"""Preallocated KV cache shared by the encoder (writes) and the decoder (reads), indexed by slot.

Full-attention layers keep K/V by absolute position: `[num_slots, max_context + 1, G, hd]`. Sliding layers
keep a ring of `window` entries per slot, entry `pos % window`, plus the absolute position stored in each
entry (-1 = empty), shared by all sliding layers because they are written at the same positions.
The extra last row of every tensor is a scratch entry: padding tokens (and prompt tokens that fall out of
the window within one forward) are written there, so writes need no data-dependent branching; it is never read.
"""

from __future__ import annotations

import torch

from .config import FULL, ModelConfig

# Shapes: S slots, L max_context, W sliding window, B rows, T tokens per row, G kv heads, hd head dim.


class KVCache:
    """Allocated once. Slots are plain ints owned by the scheduler; `reset_slot` before reusing one."""

    def __init__(self, config: ModelConfig, num_slots: int, max_context: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if num_slots < 1 or max_context < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_context >= 1, got {num_slots}, {max_context}")
        self.config, self.num_slots, self.max_context = config, num_slots, max_context
        self.window, self.device, self.dtype = config.sliding_window, torch.device(device), dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer_idx in range(config.num_hidden_layers):
            shape = (num_slots, *KVCache._slot_shape(config, layer_idx, max_context))
            self.keys.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=self.device, dtype=dtype))
        self.ring_positions = torch.full((num_slots, self.window + 1), -1, device=self.device, dtype=torch.long)

    @staticmethod
    def bytes_per_slot(config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
        """Device bytes one slot costs (K and V of every layer plus the ring positions)."""
        elem = torch.empty(0, dtype=dtype).element_size()
        total = 8 * (config.sliding_window + 1)
        for layer_idx in range(config.num_hidden_layers):
            rows, heads, head_dim = KVCache._slot_shape(config, layer_idx, max_context)
            total += 2 * rows * heads * head_dim * elem
        return total

    @staticmethod
    def _slot_shape(config: ModelConfig, layer_idx: int, max_context: int) -> tuple[int, int, int]:
        """(rows incl. the scratch row, G, hd) of one slot's K (or V) in one layer: what is allocated and
        what `bytes_per_slot` counts, from one place."""
        window_or_context = max_context if config.layer_types[layer_idx] == FULL else config.sliding_window
        return window_or_context + 1, config.layer_kv_heads(layer_idx), config.layer_head_dim(layer_idx)

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's context (full-layer rows are masked by length, so only the ring needs clearing)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        self.ring_positions[slot].fill_(-1)

    def read(self, layer_idx: int, slots: torch.Tensor, context_bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K, V of `slots` [B]: full layers the first `context_bound` positions [B, context_bound, G, hd],
        sliding layers the ring [B, W, G, hd] (entry order is ring order; see `ring_positions_of`)."""
        rows = context_bound if self.config.layer_types[layer_idx] == FULL else self.window
        return self.keys[layer_idx][:, :rows][slots], self.values[layer_idx][:, :rows][slots]

    def ring_positions_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Absolute position held by each ring entry of `slots` [B] -> [B, W] (-1 = empty)."""
        return self.ring_positions[:, : self.window][slots]

    def write_indices(self, positions: torch.Tensor, token_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row index of each new token in full-layer and ring storage, [B, T] each; invalid tokens, and tokens
        a later token of the same row pushes out of the window, go to the scratch row."""
        full_index = torch.where(token_valid, positions, self.max_context)
        last = positions.masked_fill(~token_valid, -1).amax(dim=1, keepdim=True)
        keep_in_ring = token_valid & (positions > last - self.window)
        ring_index = torch.where(keep_in_ring, positions % self.window, self.window)
        return full_index, ring_index

    def write(self, layer_idx: int, slots: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new k, v [B, T, G, hd] of `slots` [B] at rows `index` [B, T] (from `write_indices`)."""
        rows = slots[:, None].expand_as(index)
        self.keys[layer_idx].index_put_((rows, index), k.to(self.dtype))
        self.values[layer_idx].index_put_((rows, index), v.to(self.dtype))

    def write_ring_positions(self, slots: torch.Tensor, ring_index: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the absolute positions of the entries just written to the rings."""
        self.ring_positions.index_put_((slots[:, None].expand_as(ring_index), ring_index), positions)
