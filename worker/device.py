"""Device choice and memory readings for the worker (the only worker module that imports torch).

The worker process sees at most one card: `python -m worker --gpu N` sets CUDA_VISIBLE_DEVICES before
torch is imported, so inside the process the card is always `cuda:0` while metrics label it with the
physical index N.
"""

from __future__ import annotations

import os
import socket

import torch

from worker.metrics import WorkerMetrics, process_memory_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    """`auto` → cuda:0 when a card is visible, else cpu; `cuda` without a card is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("worker_device=cuda but no CUDA device is visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use --cpu")
        return torch.device("cuda:0")
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}: use auto, cpu or cuda")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA (the released weights' dtype), float32 on CPU (bf16 matmuls are slow there)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"unknown dtype {requested!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[requested]


def gpu_label(device: torch.device) -> str:
    """The `gpu` metric label, unique per card across a cluster: "<node>/GPU-<uuid>" on CUDA (every k8s pod
    runs `--gpu 0`, so an index alone would merge all cards), or "cpu" in CPU mode."""
    if device.type != "cuda":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return card_label(node_name(), visible or str(device.index or 0), str(uuid) if uuid else None)


def node_name() -> str:
    """The machine's name: NODE_NAME (the k8s downward API sets it to the node) or the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def card_label(node: str, index: str, uuid: str | None) -> str:
    """"<node>/GPU-<uuid>" when the driver reports a UUID, else "<node>/<index>"."""
    if uuid:
        return f"{node}/{uuid if uuid.startswith('GPU-') else 'GPU-' + uuid}"
    return f"{node}/{index}"


def sample_memory(metrics: WorkerMetrics, device: torch.device) -> None:
    """Refresh the memory gauges: card usage and the caching allocator on CUDA, RSS and RAM on CPU."""
    if device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        metrics.set_memory(total_bytes - free_bytes, total_bytes,
                           allocated_bytes=torch.cuda.memory_allocated(device),
                           reserved_bytes=torch.cuda.memory_reserved(device))
    else:
        rss_bytes, ram_bytes = process_memory_bytes()
        metrics.set_memory(rss_bytes, ram_bytes)
