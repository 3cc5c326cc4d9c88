"""The vocabulary pass of one denoising step at the released vocabulary: before and after the fused pass.

    OMP_NUM_THREADS=2 .venv/bin/python bench/vocab_pass_bench.py --canvases 8 --repeats 3

The `widevocab` preset (engine/config.py: vocabulary 262,144, canvas 256, hidden 64) puts the whole cost of
a step in the vocabulary: the LM head, the sampler and the self-conditioning soft embedding. Both variants
start from the same final hidden states [B, C, D] and run the LM head into fp32 logits [B, C, V], then:

- before: the previous engine's pass: the logits divided by the temperature in place, the sampler's scan of
  z (max, statistics, search: `scan_vocabulary` without a temperature runs exactly the previous passes), then
  `self_conditioning_embeds(z)` (its own max and sum passes, then the soft embedding in 32,768-id chunks);
- after: `denoise_step` reading the logits (max, statistics, search) and `self_conditioning_from_logits`
  reusing the sampler's normaliser (one more read), all in `vocab_chunk_size` chunks.

Each variant runs in its own child process (so one's memory is not the other's): peak memory is the rise of
the process's peak RSS over the first step, reported with and without the logits buffer itself
(B * C * V * 4 bytes); time is the median of `--repeats` steps after that one, the variants alternating.
Prints a table and, with --json, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import rng  # noqa: E402
from engine.config import preset as preset_config  # noqa: E402
from engine.loader import build_empty_model  # noqa: E402
from engine.model.transformer import DiffusionGemmaModel  # noqa: E402
from engine.sampler import CanvasState, SamplerInputs, denoise_step, entropy_bound_accept, scan_vocabulary  # noqa: E402

VARIANTS = ("before", "after")
VOCAB_CHUNK = 4096  # EngineConfig.vocab_chunk_size's default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="widevocab")
    parser.add_argument("--canvases", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(preset: str, canvases: int) -> tuple[DiffusionGemmaModel, torch.Tensor, CanvasState, SamplerInputs]:
    config = preset_config(preset)
    torch.manual_seed(0)
    model = build_empty_model(config, torch.device("cpu"), torch.float32)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model = model.eval().requires_grad_(False)
    length = config.canvas_length
    hidden = torch.randn(canvases, length, config.hidden_size)
    state = CanvasState(canvas_ids=torch.zeros(canvases, length, dtype=torch.int64),
                        prev_argmax=torch.full((canvases, length), -1, dtype=torch.int64),
                        stable_steps=torch.zeros(canvases, dtype=torch.int64),
                        is_fixed=torch.zeros(canvases, length, dtype=torch.bool),
                        fixed_ids=torch.zeros(canvases, length, dtype=torch.int64))
    seeds = range(canvases)
    inputs = SamplerInputs(
        temperature=torch.full((canvases,), 0.7), entropy_bound=torch.full((canvases,), 0.1),
        confidence_threshold=torch.full((canvases,), 0.005),
        stability_threshold=torch.ones(canvases, dtype=torch.int64), may_stop_early=torch.ones(canvases, dtype=torch.bool),
        sample_keys=torch.tensor([rng.stream_key(s, 0, 1, rng.STREAM_SAMPLE) for s in seeds]),
        renoise_keys=torch.tensor([rng.stream_key(s, 0, 1, rng.STREAM_RENOISE) for s in seeds]))
    return model, hidden, state, inputs


def step_before(model: DiffusionGemmaModel, hidden: torch.Tensor, state: CanvasState, inputs: SamplerInputs
                ) -> torch.Tensor:
    logits = model.logits(hidden)
    logits.div_(inputs.temperature.view(-1, 1, 1))  # z in place, as the previous engine did
    scan = scan_vocabulary(logits, inputs.sample_keys, VOCAB_CHUNK)  # the previous scan's passes over z
    keep = entropy_bound_accept(scan.entropy, inputs.entropy_bound, state.is_fixed)  # [B, C] work: negligible
    return model.self_conditioning_embeds(logits) + torch.where(keep, scan.sampled, 0).sum() * 0


def step_after(model: DiffusionGemmaModel, hidden: torch.Tensor, state: CanvasState, inputs: SamplerInputs
               ) -> torch.Tensor:
    logits = model.logits(hidden)
    out = denoise_step(logits, state, inputs, VOCAB_CHUNK)
    return model.self_conditioning_from_logits(logits, inputs.temperature, out.sc_log_norm, VOCAB_CHUNK) \
        + out.next_canvas.sum() * 0


STEPS = {"before": step_before, "after": step_after}


@torch.inference_mode()
def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant: peak RSS rise over its first step, then `repeats` timed steps."""
    model, hidden, state, inputs = build(args.preset, args.canvases)
    step = STEPS[args.child]
    baseline = peak_rss_bytes()
    first = step(model, hidden, state, inputs)
    peak_rise = peak_rss_bytes() - baseline
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        again = step(model, hidden, state, inputs)
        times.append(time.perf_counter() - started)
    assert torch.equal(first, again)
    config = preset_config(args.preset)
    logits_bytes = args.canvases * config.canvas_length * config.vocab_size * 4
    return {"variant": args.child, "canvases": args.canvases, "peak_rise_bytes": peak_rise,
            "peak_beyond_logits_bytes": peak_rise - logits_bytes, "logits_bytes": logits_bytes, "seconds": times,
            "sc_checksum": float(first.double().sum())}


def run_child(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--preset", args.preset,
               "--canvases", str(args.canvases), "--repeats", "1"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):  # alternate: drift on a shared machine hits both variants
        for variant in VARIANTS:
            results[variant].append(run_child(args, variant))
    rows = []
    for variant in VARIANTS:
        runs = results[variant]
        rows.append({"variant": variant, "canvases": args.canvases,
                     "step_seconds": statistics.median(r["seconds"][0] for r in runs),
                     "peak_rise_mib": statistics.median(r["peak_rise_bytes"] for r in runs) / 2**20,
                     "peak_beyond_logits_mib": statistics.median(r["peak_beyond_logits_bytes"] for r in runs) / 2**20,
                     "logits_mib": runs[0]["logits_bytes"] / 2**20,
                     "sc_checksum": runs[0]["sc_checksum"]})
    print(f"{'variant':8} {'canvases':>8} {'step s':>8} {'peak rise MiB':>14} {'beyond logits MiB':>18}")
    for row in rows:
        print(f"{row['variant']:8} {row['canvases']:>8} {row['step_seconds']:>8.3f} {row['peak_rise_mib']:>14.0f} "
              f"{row['peak_beyond_logits_mib']:>18.0f}")
    speedup = rows[0]["step_seconds"] / rows[1]["step_seconds"]
    print(f"after vs before: {speedup:.2f}x faster; logits alone {rows[0]['logits_mib']:.0f} MiB")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "speedup": speedup}, indent=2))


if __name__ == "__main__":
    main()
