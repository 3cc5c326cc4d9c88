"""Host bookkeeping of the paged KV cache (plain Python, no torch): block pools with reference counts,
hash-chained prefix blocks and least-recently-used eviction.

A block is identified by the hash of (its parent block's hash, its token ids); the chain's root hashes the
cache salt (model config, dtype, block size), so a hash names the exact KV a block holds: the encoder is
causal, so a block's K/V depend only on the tokens at and before it. Only complete blocks written by the
encoder (prompt, infill leading text, committed canvases) are hashed. A request's full-layer blocks are all
allocated at admission (prompt + every canvas: it can never run out mid-canvas); its sliding-layer blocks
are allocated per encode chunk and released once they fall out of the window. Released hashed blocks stay
in the cache (evictable, LRU order) until a pool needs room; with prefix caching off they are freed at once.

Requests arriving together: when a request is admitted, the hashes of the complete blocks of its known
tokens that are not cached yet become *pending*, owned by that request until its encoder writes them (or it
leaves the engine). A waiting request whose first uncached block is pending is *held back*
(`waits_for_pending`): it hits those blocks a few steps later instead of encoding them a second time.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

FULL_POOL, SLIDING_POOL = "full", "sliding"


class BlockPool:
    """`num_blocks` block ids with reference counts; hashed blocks with no reader are kept for reuse."""

    def __init__(self, num_blocks: int, caching: bool) -> None:
        self.num_blocks, self.caching = num_blocks, caching
        self.free: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 and hashed, oldest release first
        self.evictions = 0

    def available(self) -> int:
        """Blocks an allocation can take now: free ones plus cached ones nobody reads."""
        return len(self.free) + len(self.evictable)

    def used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.available()

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def cost_to_acquire(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` (cached) would leave the available set if acquired."""
        return sum(1 for block in blocks if self.refcount[block] == 0)

    def acquire(self, block: int) -> None:
        if self.refcount[block] == 0:
            self.evictable.pop(block, None)
        self.refcount[block] += 1

    def allocate(self) -> int:
        """A fresh block (refcount 1): a free one, else the least recently released cached one."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            old_hash = self.block_hash[block]
            if old_hash is not None:
                del self.cached[old_hash]
            self.block_hash[block] = None
            self.evictions += 1
        else:
            raise RuntimeError("KV block pool exhausted: admission should have prevented this")
        self.refcount[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, block_hash: bytes) -> None:
        """Name a block just completed by the encoder; a hash already cached keeps its first block."""
        if self.caching and block_hash not in self.cached and self.block_hash[block] is None:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash


@dataclass
class RequestBlocks:
    """One request's blocks: every full-layer block (logical order), the sliding blocks it holds now
    (logical index -> block) and the tokens written so far with the hashes of their complete blocks."""

    full: list[int]
    sliding: dict[int, int] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    pending: set[bytes] = field(default_factory=set)  # hashes it announced and has not written yet


@dataclass(frozen=True)
class PrefixCacheStats:
    """Cumulative counters and current pool occupancy (for metrics)."""

    query_tokens: int
    hit_tokens: int
    evicted_blocks: int
    full_blocks_used: int
    full_blocks_total: int
    sliding_blocks_used: int
    sliding_blocks_total: int


class BlockManager:
    """Block allocation and prefix caching for every request of one engine. `has_sliding`: the model has
    sliding layers (otherwise the sliding pool is unused)."""

    def __init__(self, num_full_blocks: int, num_sliding_blocks: int, block_size: int, window: int,
                 has_sliding: bool, enable_prefix_caching: bool, salt: str) -> None:
        self.block_size, self.window, self.has_sliding = block_size, window, has_sliding
        self.caching = enable_prefix_caching
        self.pools = {FULL_POOL: BlockPool(num_full_blocks, enable_prefix_caching),
                      SLIDING_POOL: BlockPool(num_sliding_blocks, enable_prefix_caching)}
        self.root = hashlib.sha256(salt.encode()).digest()
        self.requests: dict[str, RequestBlocks] = {}
        # Hash of a block an admitted request will write (known tokens, not cached at its admission) -> it.
        self.pending: dict[bytes, str] = {}
        self.query_tokens = self.hit_tokens = 0

    def blocks_needed(self, total_positions: int) -> int:
        return -(-total_positions // self.block_size)

    def fits_at_all(self, total_positions: int) -> bool:
        """Whether a request of this many positions could ever be admitted (an empty pool holds it)."""
        return self.blocks_needed(total_positions) <= self.pools[FULL_POOL].num_blocks

    def window_start_block(self, context_end: int) -> int:
        """First logical block a reader at `context_end` (next encode or a canvas) sees in sliding layers."""
        return max(0, (context_end - self.window + 1) // self.block_size)

    def prefix_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """The chained hashes of the complete blocks of `tokens` (none with prefix caching off). A waiting
        request's known tokens do not change, so callers compute this once and pass it back in."""
        return self._chain(tokens) if self.caching else []

    def waits_for_pending(self, hashes: list[bytes]) -> bool:
        """Whether a request with these prefix hashes should stay waiting: its first block that is not
        reusable now is being written by an admitted request, so it can hit it once written."""
        hit = self._longest_hit(hashes)
        return hit < len(hashes) and hashes[hit] in self.pending

    def try_admit(self, request_id: str, known_tokens: Sequence[int], total_positions: int,
                  hashes: list[bytes] | None = None) -> int | None:
        """Reserve a request's blocks, reusing the longest cached prefix of `known_tokens` (whole blocks;
        `hashes`: their `prefix_hashes`, computed here if not given). Returns the number of cached tokens
        (a multiple of the block size), or None when the pool cannot hold the request now (nothing changes
        then). The uncached complete blocks nobody else is writing become pending, owned by this request."""
        full = self.pools[FULL_POOL]
        if hashes is None:
            hashes = self.prefix_hashes(known_tokens)
        hit = self._longest_hit(hashes)
        cached_full = [full.cached[h] for h in hashes[:hit]]
        fresh = self.blocks_needed(total_positions) - hit
        if fresh + full.cost_to_acquire(cached_full) > full.available():
            return None
        for block in cached_full:
            full.acquire(block)
        state = RequestBlocks(full=cached_full + [full.allocate() for _ in range(fresh)],
                              tokens=list(known_tokens[:hit * self.block_size]), hashes=hashes[:hit])
        sliding = self.pools[SLIDING_POOL]
        for logical in range(self.window_start_block(hit * self.block_size), hit) if self.has_sliding else ():
            block = sliding.cached[hashes[logical]]
            sliding.acquire(block)
            state.sliding[logical] = block
        for block_hash in hashes[hit:]:
            if block_hash not in self.pending and full.lookup(block_hash) is None:
                self.pending[block_hash] = request_id
                state.pending.add(block_hash)
        self.requests[request_id] = state
        if self.caching:
            self.query_tokens += len(known_tokens)
            self.hit_tokens += hit * self.block_size
        return hit * self.block_size

    def prepare_write(self, request_id: str, start: int, count: int) -> None:
        """Allocate the sliding blocks positions start..start+count-1 will be written to."""
        if not self.has_sliding or count <= 0:
            return
        state, sliding = self.requests[request_id], self.pools[SLIDING_POOL]
        for logical in range(start // self.block_size, (start + count - 1) // self.block_size + 1):
            if logical not in state.sliding:
                state.sliding[logical] = sliding.allocate()

    def after_write(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The encoder wrote `token_ids` after the request's earlier tokens: name the blocks they completed,
        then release the sliding blocks no reader will see again."""
        state = self.requests.get(request_id)
        if state is None:
            return
        state.tokens.extend(token_ids)
        bs = self.block_size
        while len(state.tokens) >= (len(state.hashes) + 1) * bs:
            logical = len(state.hashes)
            parent = state.hashes[-1] if state.hashes else self.root
            block_hash = _hash_block(parent, state.tokens[logical * bs:(logical + 1) * bs])
            state.hashes.append(block_hash)
            if block_hash in state.pending:  # written now: followers held back for it may hit it
                state.pending.discard(block_hash)
                del self.pending[block_hash]
            self.pools[FULL_POOL].register(state.full[logical], block_hash)
            if logical in state.sliding:
                self.pools[SLIDING_POOL].register(state.sliding[logical], block_hash)
        keep_from = self.window_start_block(len(state.tokens))
        for logical in [i for i in state.sliding if i < keep_from]:
            self.pools[SLIDING_POOL].release(state.sliding.pop(logical))

    def free(self, request_id: str) -> None:
        """Release every block of a finished or aborted request (last blocks first, so the shared leading
        blocks of a prefix are the most recently used and the last evicted)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        for block_hash in state.pending:  # never written (cancelled, failed): held requests re-query
            del self.pending[block_hash]
        for logical in sorted(state.sliding, reverse=True):
            self.pools[SLIDING_POOL].release(state.sliding[logical])
        for block in reversed(state.full):
            self.pools[FULL_POOL].release(block)

    def stats(self) -> PrefixCacheStats:
        full, sliding = self.pools[FULL_POOL], self.pools[SLIDING_POOL]
        return PrefixCacheStats(
            query_tokens=self.query_tokens, hit_tokens=self.hit_tokens,
            evicted_blocks=full.evictions + sliding.evictions, full_blocks_used=full.used(),
            full_blocks_total=full.num_blocks, sliding_blocks_used=sliding.used(),
            sliding_blocks_total=sliding.num_blocks)

    def _chain(self, tokens: Sequence[int]) -> list[bytes]:
        """Hashes of the complete blocks of `tokens`, chained from the root."""
        hashes, parent, bs = [], self.root, self.block_size
        for logical in range(len(tokens) // bs):
            parent = _hash_block(parent, tokens[logical * bs:(logical + 1) * bs])
            hashes.append(parent)
        return hashes

    def _longest_hit(self, hashes: list[bytes]) -> int:
        """Leading blocks reusable as a whole: cached in the full pool and, for sliding layers, with the
        blocks of the window before the hit's end still cached in the sliding pool."""
        full, sliding = self.pools[FULL_POOL], self.pools[SLIDING_POOL]
        hit = 0
        while hit < len(hashes) and full.lookup(hashes[hit]) is not None:
            hit += 1
        if not self.has_sliding:
            return hit
        while hit > 0 and any(sliding.lookup(hashes[i]) is None
                              for i in range(self.window_start_block(hit * self.block_size), hit)):
            hit -= 1
        return hit


def _hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()
