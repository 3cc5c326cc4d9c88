"""DiffusionGemma text model: one weight stack run in encoder mode (causal, writes the KV cache) and in
decoder mode (bidirectional over the canvas, reads the cache), plus the tied LM head with softcap.

Batched over rows with right padding and per-row absolute positions; attention masks are built once per
forward per layer type from those positions, and nothing in a forward reads tensor values on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, SLIDING, ModelConfig
from ..kv_cache import BlockTables, PagedKVCache, blocks_for
from .attention import additive_mask, folds_gqa_queries
from .layer import TransformerLayer
from .norms import RMSNorm
from .rope import inverse_frequencies, rope_cos_sin
from .self_conditioning import SelfConditioning

# Shapes: B rows (canvases or prompt chunks), T tokens per row, C canvas length, V vocab, D hidden,
# L full-layer context bound, W sliding window.

VOCAB_CHUNK = 32_768  # vocabulary-sized products run in slices of this many ids to bound temporaries

# ((rows, context bound), ...): contiguous runs of a decoder batch's rows and the past positions each reads.
RowGroups = tuple[tuple[int, int], ...]


class DiffusionGemmaModel(nn.Module):
    """Parameter names match the released checkpoint after stripping `model.decoder.`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config.hidden_size, config.intermediate_size, config.rms_norm_eps)

    # ----- public API (docs/architecture.md, "Model") -----

    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
               cache: PagedKVCache, slots: torch.Tensor | BlockTables, return_logits: bool = False,
               context_bound: int | None = None) -> torch.Tensor:
        """Encoder mode over input_ids [B, T] at `positions` [B, T] (increasing within a row); rows are padded
        on the right (`token_valid` False). `slots` addresses the cache: slot ids [B] for a slot-addressed
        `KVCache`, the rows' `BlockTables` for the paged cache. Each row attends causally to its cached
        tokens at positions below the row's first position and to its own new tokens; sliding layers see
        the last `window` positions including the query. The valid tokens' K/V are written into the cache;
        padding writes nothing visible. `context_bound` (host int, default cache.max_context) must be >=
        every row's first position: layers read only the blocks holding that many positions. Returns fp32
        softcapped logits [B, T, V] if `return_logits`, else the final hidden states [B, T, D] before the
        final norm (training applies `logits` to the positions it scores only; serving ignores them)."""
        bound = self._check_inputs(input_ids, positions, cache, slots, context_bound)
        if token_valid.shape != input_ids.shape:
            raise ValueError(f"token_valid shape {tuple(token_valid.shape)} != input_ids shape {tuple(input_ids.shape)}")
        h = self.embed(input_ids)
        rope = self._rope_tables(positions, h.dtype)
        index = cache.forward_index(cache.tables(slots, positions[:, 0]), positions, token_valid, bound)
        masks = self._encoder_masks(positions, token_valid, index.key_positions)
        if folds_gqa_queries(h.device):
            masks = self._fold_masks_for_gqa(masks)
        masks = {kind: additive_mask(mask, h.dtype) for kind, mask in masks.items()}
        for layer_idx, layer in enumerate(self.layers):
            layer_type = self.config.layer_types[layer_idx]
            past_k, past_v = cache.read(layer_idx, index.read[layer_type])
            h, k, v = layer(h, *rope[layer_type], past_k, past_v, masks[layer_type])
            cache.write(layer_idx, index.write[layer_type], k, v)
        return self.logits(h) if return_logits else h

    def denoise(self, canvas_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                slots: torch.Tensor | BlockTables, context_lens: torch.Tensor, sc_embeds: torch.Tensor | None,
                context_bound: int | None = None, row_groups: RowGroups | None = None) -> torch.Tensor:
        """Decoder mode over canvas_ids [B, C] at `positions` [B, C]: every canvas token sees the whole canvas
        and the row's cached positions < context_lens [B] (sliding layers: only the last `window - 1` of
        them, as the reference's dynamic cache keeps). Never writes the cache. `slots` as in `encode`.
        `sc_embeds` [B, C, D] is the self-conditioning soft embedding (None or zeros = no signal).
        `context_bound` (host int, default cache.max_context) must be >= max(context_lens). `row_groups`
        (host ints, optional): ((rows, bound), ...) splits the batch into contiguous runs of rows, in order, whose
        full-attention layers read only `bound` past positions (each >= its rows' context_lens, <= context_bound;
        the counts sum to B): rows sorted by context length then skip the keys only longer rows need. The
        result equals the ungrouped one up to float rounding (SDPA's accumulation order follows the key
        count, as it does whenever a batch's longest context changes). Returns fp32 softcapped logits [B, C, V]."""
        bound = self._check_inputs(canvas_ids, positions, cache, slots, context_bound)
        if sc_embeds is not None and sc_embeds.shape != (*canvas_ids.shape, self.config.hidden_size):
            raise ValueError(f"sc_embeds shape {tuple(sc_embeds.shape)} must be "
                             f"{(*canvas_ids.shape, self.config.hidden_size)}")
        h = self.self_conditioning(self.embed(canvas_ids), sc_embeds)
        rope = self._rope_tables(positions, h.dtype)
        index = cache.forward_index(cache.tables(slots, context_lens), positions, None, bound)
        masks = {kind: additive_mask(mask, h.dtype) for kind, mask in
                 self._decoder_masks(context_lens, index.key_positions, canvas_ids.shape[1]).items()}
        groups = None
        if row_groups is not None and len(row_groups) > 1 and FULL in index.read:
            groups = self._full_layer_row_groups(index.read[FULL], masks[FULL], row_groups, cache.block_size)
        for layer_idx, layer in enumerate(self.layers):
            layer_type = self.config.layer_types[layer_idx]
            if groups is not None and layer_type == FULL:
                reads = [cache.read(layer_idx, rows) for rows in groups[0]]
                h, _, _ = layer(h, *rope[layer_type], tuple(k for k, _ in reads), tuple(v for _, v in reads),
                                groups[1])
                continue
            past_k, past_v = cache.read(layer_idx, index.read[layer_type])
            h, _, _ = layer(h, *rope[layer_type], past_k, past_v, masks[layer_type])
        return self.logits(h)

    @staticmethod
    def _full_layer_row_groups(read: torch.Tensor, mask: torch.Tensor, row_groups: RowGroups, block_size: int
                               ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per row group: its storage rows [b, S_g] (the first S_g of `read` [B, S], whole blocks covering the
        group's bound) and its decoder mask [b, 1, 1, S_g + C] (from `mask` [B, 1, 1, S + C])."""
        width = read.shape[1]
        if sum(rows for rows, _ in row_groups) != read.shape[0]:
            raise ValueError(f"row_groups {row_groups} must cover the batch's {read.shape[0]} rows")
        reads, masks, start = [], [], 0
        for rows, bound in row_groups:
            keys = min(width, blocks_for(bound, block_size) * block_size)
            reads.append(read[start:start + rows, :keys])
            rows_mask = mask[start:start + rows]
            masks.append(torch.cat((rows_mask[..., :keys], rows_mask[..., width:]), dim=-1))
            start += rows
        return tuple(reads), tuple(masks)

    def self_conditioning_embeds(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """softmax(sc_logits) @ E * sqrt(D) -> [B, C, D] in the model dtype, softmax in fp32, processed in
        vocabulary chunks so no second [B, C, V] tensor is materialised."""
        weight = self.embed_tokens.weight
        vocab = weight.shape[0]
        if vocab <= VOCAB_CHUNK:  # one chunk: the fused softmax is one pass instead of seven
            probs = torch.softmax(sc_logits, dim=-1, dtype=torch.float32).to(weight.dtype)
            return (probs @ weight).to(weight.dtype) * self._embed_scale(weight.dtype)
        peak = sc_logits.amax(dim=-1, keepdim=True).float()
        total = torch.zeros_like(peak)
        for start in range(0, vocab, VOCAB_CHUNK):
            total += torch.exp(sc_logits[..., start:start + VOCAB_CHUNK].float() - peak).sum(-1, keepdim=True)
        log_norm = peak + torch.log(total)
        soft = torch.zeros(*sc_logits.shape[:-1], weight.shape[1], device=weight.device, dtype=torch.float32)
        for start in range(0, vocab, VOCAB_CHUNK):
            probs = torch.exp(sc_logits[..., start:start + VOCAB_CHUNK].float() - log_norm).to(weight.dtype)
            soft += (probs @ weight[start:start + VOCAB_CHUNK]).float()
        return soft.to(weight.dtype) * self._embed_scale(weight.dtype)

    def self_conditioning_from_logits(self, logits: torch.Tensor, temperature: torch.Tensor, log_norm: torch.Tensor,
                                      vocab_chunk: int) -> torch.Tensor:
        """The serving path of `self_conditioning_embeds`: softmax(z) @ E * sqrt(D) -> [B, C, D] in the model
        dtype, where z = logits [B, C, V] * (1 / temperature [B]) rounded to the model dtype (as the reference feeds
        its scaled logits back) and log_norm [B, C] = log sum exp(z), which the sampler's statistics pass
        already computed (`SamplerOutput.sc_log_norm`). Reads the logits once, in chunks of `vocab_chunk` ids:
        z and the probabilities exist only per chunk, and the logits are never written."""
        weight = self.embed_tokens.weight
        inv_t, norm = (1.0 / temperature).view(-1, 1, 1), log_norm.unsqueeze(-1)
        soft = torch.zeros(*logits.shape[:-1], weight.shape[1], device=weight.device, dtype=torch.float32)
        for start in range(0, weight.shape[0], vocab_chunk):
            z = logits[..., start:start + vocab_chunk].float() * inv_t
            if weight.dtype != torch.float32:
                z = z.to(weight.dtype).float()
            probs = z.sub_(norm).exp_().to(weight.dtype)
            soft += (probs @ weight[start:start + vocab_chunk]).float()
        return soft.to(weight.dtype) * self._embed_scale(weight.dtype)

    # ----- building blocks -----

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] * sqrt(D), the scale rounded to the weight dtype first (as the released model does)."""
        weight = self.embed_tokens.weight
        return F.embedding(ids, weight) * self._embed_scale(weight.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, tied LM head, then `cap * tanh(logits / cap)` in fp32, one vocabulary chunk at a time."""
        x = self.norm(h)
        weight, cap = self.embed_tokens.weight, self.config.final_logit_softcapping
        if torch.is_grad_enabled() and weight.shape[0] <= VOCAB_CHUNK:
            # Training on a small vocabulary: one out-of-place expression, so autograd neither zero-fills
            # nor copies a logits-sized buffer for the chunked write below.
            return torch.tanh(F.linear(x, weight).float() / cap) * cap
        out = torch.empty(*x.shape[:-1], weight.shape[0], device=x.device, dtype=torch.float32)
        for start in range(0, weight.shape[0], VOCAB_CHUNK):
            chunk = F.linear(x, weight[start:start + VOCAB_CHUNK]).float()
            target = out[..., start:start + VOCAB_CHUNK]
            if torch.is_grad_enabled():  # training: keep autograd-friendly out-of-place ops
                target.copy_(torch.tanh(chunk / cap) * cap)
            else:  # serving: in place, one fewer pass over a vocabulary-sized chunk and no extra temporaries
                torch.tanh(chunk.div_(cap), out=target)
                target.mul_(cap)
        return out

    def _embed_scale(self, dtype: torch.dtype) -> float:
        # Rounded on the host CPU: no device work, no sync.
        return float(torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32).to(dtype))

    def _check_inputs(self, ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                      slots: torch.Tensor | BlockTables, context_bound: int | None) -> int:
        if ids.dim() != 2 or positions.shape != ids.shape:
            raise ValueError(f"ids must be [B, T] and positions the same shape; got {tuple(ids.shape)} and "
                             f"{tuple(positions.shape)}")
        rows = slots.rows if isinstance(slots, BlockTables) else (slots.shape[0] if slots.dim() == 1 else -1)
        if rows != ids.shape[0]:
            raise ValueError(f"slots (or block tables) must have one row per input row = {ids.shape[0]}, got "
                             f"{tuple(slots.full.shape if isinstance(slots, BlockTables) else slots.shape)}")
        bound = cache.max_context if context_bound is None else context_bound
        if not 0 <= bound <= cache.max_context:
            raise ValueError(f"context_bound {bound} must be within 0..cache.max_context ({cache.max_context})")
        return bound

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cfg, device = self.config, positions.device
        inv_freq = {
            SLIDING: inverse_frequencies(cfg.head_dim, cfg.sliding_rope_theta, device=device),
            FULL: inverse_frequencies(cfg.global_head_dim, cfg.full_rope_theta, cfg.full_partial_rotary_factor,
                                      cfg.full_rope_factor, device=device),
        }
        return {kind: rope_cos_sin(positions, inv_freq[kind], dtype) for kind in set(cfg.layer_types)}

    def _encoder_masks(self, positions: torch.Tensor, token_valid: torch.Tensor,
                       key_positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bool masks [B, 1, T, past + T] per layer type present (True = attend); `key_positions` [B or 1, S]
        are the absolute positions of the gathered past keys."""
        window, t = self.config.sliding_window, positions.shape[1]
        query = positions[:, None, :, None]                                   # [B, 1, T, 1]
        context_start = positions[:, None, :1, None]                          # [B, 1, 1, 1]
        new_key = positions[:, None, None, :]                                 # [B, 1, 1, T]
        # The diagonal keeps padded query rows from being fully masked (SDPA would return NaN there).
        diagonal = torch.eye(t, dtype=torch.bool, device=positions.device)
        new_ok = (token_valid[:, None, None, :] & (new_key <= query)) | diagonal
        masks = {}
        for kind, keys in key_positions.items():
            past = keys[:, None, None, :]                                     # [B or 1, 1, 1, S]
            if kind == FULL:
                visible = (past < context_start).expand(positions.shape[0], 1, t, past.shape[-1])
                masks[kind] = torch.cat((visible, new_ok), dim=-1)
            else:
                visible = (past < context_start) & (past > query - window)
                masks[kind] = torch.cat((visible, new_ok & (new_key > query - window)), dim=-1)
        return masks

    def _fold_masks_for_gqa(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[B, 1, T, S] -> [B, 1, R*T, S] per layer type present (R query heads per kv head, as
        `Attention.attend` folds queries): one repeat per layer type and forward instead of one per layer."""
        folded = {}
        for kind, mask in masks.items():
            layer_idx = self.config.layer_types.index(kind)
            per_group = self.config.num_attention_heads // self.config.layer_kv_heads(layer_idx)
            folded[kind] = mask.repeat(1, 1, per_group, 1) if per_group > 1 else mask
        return folded

    def _decoder_masks(self, context_lens: torch.Tensor, key_positions: dict[str, torch.Tensor],
                       canvas_length: int) -> dict[str, torch.Tensor]:
        """Bool masks [B, 1, 1, past + C] per layer type present: the same visibility for every canvas query."""
        window = self.config.sliding_window
        lens = context_lens[:, None]                                          # [B, 1]
        canvas = torch.ones(lens.shape[0], canvas_length, dtype=torch.bool, device=lens.device)
        masks = {}
        for kind, keys in key_positions.items():
            visible = keys < lens
            if kind == SLIDING:
                visible = visible & (keys >= lens - (window - 1))
            masks[kind] = torch.cat((visible.expand(lens.shape[0], -1), canvas), -1)[:, None, None, :]
        return masks
