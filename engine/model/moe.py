"""Feed-forward blocks: the dense GeGLU MLP, the top-k router and the packed experts.

Experts run as grouped GEMMs (`torch.nn.functional.grouped_mm`) where torch supports them for the
device/dtype, otherwise as a loop over contiguous per-expert groups of expert-sorted tokens. Under torch.compile
where grouped_mm does not trace (fp32), they run block-aligned (`Experts._blocked`: static shapes, about the
routed FLOPs) or, for few tokens, where the blocks' own overhead outweighs what they save, densely (every
expert on every token). Experts kept in FP8 (`Experts.keep_fp8`) run the grouped and loop paths through
`engine.model.fp8` (`_scaled_grouped_mm` / `_scaled_mm`), and densely under compilation without the former.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import FP8_DTYPE, scaled_grouped_linear, scaled_grouped_mm_works, scaled_linear

# Shapes: N tokens, D hidden, I expert width, E experts, K experts per token, P = N*K token-expert pairs.

GROUPED_MM, LOOP, DENSE, BLOCKED = "grouped_mm", "loop", "dense", "blocked"
EXPERT_BLOCK = 16  # rows per block of the BLOCKED path (measured at tiny's shapes: docs/benchmarks.md, issue 14)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))` without biases: each layer's dense MLP. (SelfConditioning computes the
    same with its own projections, whose checkpoint names sit directly under `self_conditioning.`.)"""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k routing on the raw residual: weightless RMSNorm, `* scale * D**-0.5`, softmax in fp32,
    top-k renormalised to sum 1, then multiplied by `per_expert_scale[idx]`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float) -> None:
        super().__init__()
        self.top_k, self.eps, self.root_scale = top_k, eps, hidden_size ** -0.5
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, normed_residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_residual [N, D] = the weightless RMSNorm of the raw residual in the model dtype (the layer
        shares that pass with its pre-feedforward norms) -> (fp32 weights [N, K], expert ids [N, K])."""
        x = normed_residual * self.scale * self.root_scale
        # The top-k of softmax(logits), renormalised over the k, is softmax over the top-k logits (softmax is
        # monotonic and its normaliser cancels): one softmax over K ids per token instead of one over E plus a
        # sum and a division.
        top_logits, experts = torch.topk(self.proj(x), self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        return weights * self.per_expert_scale[experts], experts


# Probe results by (device type, dtype): a plain dict, not functools.cache, because torch.compile reads a global
# dict's entries as constants but traces through a cached function (and the probe's host read breaks the graph);
# `probe_expert_kernels` fills it before anything is compiled.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def probe_expert_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Run the grouped-matmul probes for `device` eagerly, so a compiled region only reads their results."""
    _grouped_mm_works(device.type, dtype)
    scaled_grouped_mm_works(device.type)


def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs (and agrees with matmul) for this device type and dtype; probed once."""
    key = (device_type, dtype)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _probe_grouped_mm(device_type, dtype)
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        # Fixed values, not randn: probing must not consume the caller's global RNG stream.
        x = (torch.arange(96, device=device_type) % 7 - 3).reshape(6, 16).to(dtype)
        w = (torch.arange(256, device=device_type) % 5 - 2).reshape(2, 8, 16).to(dtype)
        offs = torch.tensor([2, 6], dtype=torch.int32, device=device_type)
        got = F.grouped_mm(x, w.transpose(1, 2), offs=offs)
        want = torch.cat([x[:2] @ w[0].T, x[2:] @ w[1].T])
        return bool(torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def default_expert_backend(device: torch.device, dtype: torch.dtype) -> str:
    """grouped_mm on CUDA bf16 (the production path) and on CPU fp32 inference where this torch has a
    kernel; the loop otherwise. CPU grouped_mm has no backward in this torch, so training uses the loop.
    Under torch.compile (engine/compiled_step.py) grouped_mm traces only in bf16 and the loop's host-side
    group bounds would break the graph, so other dtypes run block-aligned (`Experts._blocked`)."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return BLOCKED  # Experts.forward falls back to DENSE where blocks would not save FLOPs
    if device.type == "cuda" and dtype == torch.bfloat16 and _grouped_mm_works("cuda", dtype):
        return GROUPED_MM
    if device.type == "cpu" and dtype == torch.float32 and not torch.is_grad_enabled():
        return GROUPED_MM if _grouped_mm_works("cpu", dtype) else LOOP
    return LOOP


class Experts(nn.Module):
    """Packed experts: `gate_up_proj [E, 2I, D]` (gate = first I rows) and `down_proj [E, D, I]`.
    `backend` is None (choose per call from device/dtype), GROUPED_MM or LOOP."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int) -> None:
        super().__init__()
        self.num_experts, self.expert_size = num_experts, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.backend: str | None = None
        self.is_fp8 = False

    def keep_fp8(self) -> None:
        """Hold both projections as float8_e4m3fn buffers with fp32 per-row scales (`gate_up_proj_scale` [E, 2I],
        `down_proj_scale` [E, D]), to be filled by the loader; matmuls then quantise activations per token."""
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(self, name)
            delattr(self, name)
            self.register_buffer(name, torch.empty(dense.shape, dtype=FP8_DTYPE, device=dense.device))
            self.register_buffer(f"{name}_scale", torch.empty(dense.shape[:2], dtype=torch.float32,
                                                               device=dense.device))
        self.is_fp8 = True

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights fp32 [N, K], experts [N, K] -> [N, D] = sum_k w_k * expert_k(x)."""
        n, k = experts.shape
        backend = self.backend or self._default_backend(x)
        # Blocks pay a sort and scatters of their own: worth it from half the dense rows (at tiny's shapes:
        # 0.8 vs 2.0 ms a layer at 512 tokens, 0.30 vs 0.18 ms at 32, compiled, one thread).
        if backend == BLOCKED and 2 * blocked_rows(n * k, self.num_experts, EXPERT_BLOCK) <= n * self.num_experts:
            return self._blocked(x, weights, experts)
        if backend in (BLOCKED, DENSE):
            return self._dense(x, weights, experts)
        flat = experts.reshape(-1)
        sorted_experts, order = torch.sort(flat, stable=True)  # pairs grouped by expert (values for free)
        sorted_x = x[order // k]                               # [P, D]
        # searchsorted, not bincount: bincount sizes its output from the data, which syncs on CUDA.
        expert_ids = torch.arange(self.num_experts, device=flat.device, dtype=flat.dtype)
        group_ends = torch.searchsorted(sorted_experts, expert_ids, right=True)
        # Routing weights scale the [P, I] activations rather than the [P, D] outputs (down_proj is linear):
        # 4x less elementwise traffic at the released shapes.
        sorted_w = weights.reshape(-1)[order, None].to(x.dtype)
        run = self._grouped if backend == GROUPED_MM else self._loop
        sorted_y = run(sorted_x, sorted_w, group_ends)         # [P, D]
        # Unpermute then sum the K contributions of each token: a fixed summation order (no atomics), so a
        # token's output does not depend on what else is in the batch.
        pair_y = torch.empty_like(sorted_y).index_copy_(0, order, sorted_y)
        return pair_y.view(n, k, -1).sum(dim=1)

    def _default_backend(self, x: torch.Tensor) -> str:
        if self.is_fp8:
            if scaled_grouped_mm_works(x.device.type):
                return GROUPED_MM
            return DENSE if torch.compiler.is_compiling() else LOOP  # the loop's host-side bounds break a graph
        return default_expert_backend(x.device, x.dtype)

    def _grouped(self, sorted_x: torch.Tensor, sorted_w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        offs = group_ends.to(torch.int32)
        gate, up = self._grouped_project("gate_up_proj", sorted_x, offs).split(self.expert_size, dim=-1)
        return self._grouped_project("down_proj", gelu_tanh(gate) * up * sorted_w, offs)

    def _grouped_project(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Expert-sorted x [P, in] through every expert's `name` projection -> [P, out]."""
        if self.is_fp8:
            return scaled_grouped_linear(x, getattr(self, name), getattr(self, f"{name}_scale"), offs)
        return F.grouped_mm(x, getattr(self, name).transpose(1, 2), offs=offs)

    def _project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] through one expert's `name` projection -> [n, out]."""
        if self.is_fp8:
            return scaled_linear(x, getattr(self, name)[expert], getattr(self, f"{name}_scale")[expert])
        return F.linear(x, getattr(self, name)[expert])

    def _loop(self, sorted_x: torch.Tensor, sorted_w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        # Group boundaries must be host ints to slice; this path serves CPU (where reading them is free),
        # dtypes grouped_mm lacks and FP8 experts on cards without `_scaled_grouped_mm`; never the CUDA bf16
        # production path.
        ends = group_ends.tolist()
        outputs, start = [], 0
        for expert, end in enumerate(ends):
            if end > start:
                gate, up = self._project("gate_up_proj", expert, sorted_x[start:end]).split(self.expert_size, dim=-1)
                outputs.append(self._project("down_proj", expert, gelu_tanh(gate) * up * sorted_w[start:end]))
            start = end
        return torch.cat(outputs) if outputs else sorted_x.new_zeros(0, self.down_proj.shape[1])

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, each scaled by its routing weight (0 where not routed): E/K times the
        FLOPs, but static shapes and no host reads, so it traces whole. [N, D] -> [N, D]."""
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        combine = combine.scatter_add(1, experts, weights).T.unsqueeze(-1).to(x.dtype)  # [E, N, 1]
        if self.is_fp8:  # FP8 weights: each expert's scaled matmuls over every token, a static loop over E
            out = torch.zeros_like(x)
            for expert in range(self.num_experts):
                gate, up = self._project("gate_up_proj", expert, x).split(self.expert_size, dim=-1)
                out = out + self._project("down_proj", expert, gelu_tanh(gate) * up * combine[expert])
            return out
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).split(self.expert_size, dim=-1)  # [E, N, I]
        return torch.matmul(gelu_tanh(gate) * up * combine, self.down_proj.transpose(1, 2)).sum(dim=0)

    def _blocked(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Block-aligned experts: the P pairs sorted by expert, each expert's group padded to whole blocks of
        EXPERT_BLOCK rows (padding rows are a zero token with weight 0), then two batched matmuls over the
        blocks, each block with its expert's weights gathered. Static shapes (NB = `blocked_rows` / block, an
        upper bound; blocks past the last group are all padding) and no host reads, so it traces whole. It
        computes (P // block + E) x block rows, against N x E for `_dense` (P = N x K: 1,152 vs 4,096 rows for
        512 tokens, E = 8, K = 2, blocks of 16). Not for FP8 experts (bmm has no FP8 kernel). [N, D] -> [N, D];
        each pair's output is one row of a matmul, summed over its token's K pairs in a fixed order."""
        n, k = experts.shape
        pairs, block = n * k, EXPERT_BLOCK
        num_blocks = blocked_rows(pairs, self.num_experts, block) // block
        sorted_experts, order = torch.sort(experts.reshape(-1), stable=True)  # [P]
        expert_ids = torch.arange(self.num_experts, device=x.device, dtype=sorted_experts.dtype)
        group_ends = torch.searchsorted(sorted_experts, expert_ids, right=True)  # [E]
        counts = torch.diff(group_ends, prepend=group_ends.new_zeros(1))
        block_ends = torch.cumsum((counts + block - 1) // block, dim=0)  # [E], in blocks
        first_row = (block_ends - (counts + block - 1) // block) * block - (group_ends - counts)  # [E]
        slot = torch.arange(pairs, device=x.device) + first_row[sorted_experts]  # [P]: sorted pair -> padded row
        rows = num_blocks * block
        # padded row -> token (n: the zero row appended to x) and routing weight (0 for padding)
        token = torch.full((rows,), n, device=x.device, dtype=order.dtype).scatter(0, slot, order // k)
        row_weight = weights.new_zeros(rows).scatter(0, slot, weights.reshape(-1)[order])
        padded_x = torch.cat([x, x.new_zeros(1, x.shape[1])])[token].view(num_blocks, block, -1)  # [NB, b, D]
        blocks = torch.arange(num_blocks, device=x.device, dtype=block_ends.dtype)
        block_expert = torch.searchsorted(block_ends, blocks, right=True).clamp_(max=self.num_experts - 1)
        gate, up = torch.bmm(padded_x, self.gate_up_proj[block_expert].transpose(1, 2)).split(self.expert_size, -1)
        hidden = gelu_tanh(gate) * up * row_weight.view(num_blocks, block, 1).to(x.dtype)  # [NB, b, I]
        padded_y = torch.bmm(hidden, self.down_proj[block_expert].transpose(1, 2)).view(rows, -1)  # [NB*b, D]
        pair_slot = torch.empty_like(slot).scatter_(0, order, slot)  # pair (token-major) -> padded row
        return padded_y[pair_slot].view(n, k, -1).sum(dim=1)


def blocked_rows(pairs: int, num_experts: int, block: int) -> int:
    """Padded rows of `Experts._blocked` for `pairs` token-expert pairs: a static bound on the sum over experts
    of their groups rounded up to whole blocks (each group wastes under one block: sum ceil(c_e / b) <=
    P // b + E)."""
    return (pairs // block + num_experts) * block
