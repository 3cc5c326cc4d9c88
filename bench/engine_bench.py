"""Engine throughput: our engine and the `transformers` reference on the same random weights, in one process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/engine_bench.py --preset tiny --batches 1,16 --steps 16 \
        --impls ours-eager,ours-compiled,reference,reference-static --json /tmp/engine_bench.json
    python bench/engine_bench.py --preset full --device cuda --dtype bfloat16 --batches 1,16 --steps 16

Implementations (`--impls`, side by side in one run): `ours` (compiled or not per `--compile on|off`, which sets
`EngineConfig.compile_step`), `ours-eager`, `ours-compiled`, `reference` (eager, dynamic cache) and
`reference-static` (the reference's `cache_implementation="static"`, with which its `generate` compiles the
encoder, decoder and sampler with torch.compile; a point where that fails is reported with its error, not
dropped). Any preset of engine/config.py runs (`tiny`, `small`, `full`, and the wide-vocabulary one where the
tree has it).

The reference `DiffusionGemmaForBlockDiffusion` is built with random weights and our model is given the very
same tensors (no copy). Both run B identical-length random prompts for `--canvases` canvases at `--steps`
fixed denoising steps: our requests use `fixed_steps`, the reference a confidence threshold no random model
reaches; stop tokens are disabled on both sides (an id outside the vocabulary), so every row generates every
canvas. Each measurement is the median of `--repeats` runs after one warm-up run; ours and the reference
alternate so that drift on a shared machine hits both. "Forwards" counts model passes (encoder and decoder
passes, as docs/performance.md counts them). Peak memory is CUDA's allocator peak; on CPU it is not
measured (null). Prints a table and, with --json, writes {"rows": [...], "ratios": [...], "token_checks": [...],
"settings": {...}}; ratios are each of our implementations' speed over each reference implementation's at the same batch; token checks
compare the committed tokens of each of our implementations with the first one's (e.g. compiled vs eager).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgtext.byte_tokenizer import build_byte_tokenizer  # noqa: E402
from dgtext.tokenizer import PromptTokenizer  # noqa: E402
from engine import Engine, EngineConfig, EngineRequest, LoadedModel, SamplingParams  # noqa: E402
from engine.config import preset as preset_config  # noqa: E402
from engine.loader import WEIGHT_PREFIX, build_empty_model  # noqa: E402
from engine.types import GenerationDefaults  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset: tiny | small | full")
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas")
    parser.add_argument("--canvases", type=int, default=2, help="canvases generated per request")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: canvas length)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--impls", default="ours,reference",
                        help=f"comma-separated, from {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--compile", default="off", choices=["on", "off"],
                        help="EngineConfig.compile_step for the `ours` implementation")
    parser.add_argument("--compile-encoder", default="auto", choices=["auto", "on", "off"],
                        help="EngineConfig.compile_encoder for the compiled implementations (auto: as compile_step)")
    parser.add_argument("--compile-sampler", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile our sampler's vocabulary scan (auto: on CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    args.impl_list = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(args.impl_list) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--impls: unknown implementation(s) {unknown}; choose from {', '.join(IMPLEMENTATIONS)}")
    wants_compiled = "ours-compiled" in args.impl_list or ("ours" in args.impl_list and args.compile == "on")
    if wants_compiled and not has_compile_step():
        parser.error("--compile on / ours-compiled need EngineConfig.compile_step (the compiled whole step of "
                     "issue 14), which this engine does not have yet")
    return args


IMPLEMENTATIONS = ("ours", "ours-eager", "ours-compiled", "reference", "reference-static")
REFERENCES = ("reference", "reference-static")


def has_compile_step() -> bool:
    return "compile_step" in {f.name for f in dataclasses.fields(EngineConfig)}


def build_models(preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[LoadedModel, Any]:
    """The reference model with random weights, and our model sharing its decoder tensors."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = preset_config(preset)
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of a 25B-parameter model
    try:
        with torch.device(device):
            reference = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_dict(config.to_hf_dict()))
    finally:
        torch.set_default_dtype(previous_dtype)
    reference = reference.to(dtype).eval().requires_grad_(False)
    ours = build_empty_model(config, torch.device("meta"), dtype)
    shared = {name.removeprefix(WEIGHT_PREFIX): tensor for name, tensor in reference.state_dict().items()
              if name.startswith(WEIGHT_PREFIX)}
    ours.load_state_dict(shared, assign=True)
    ours = ours.eval().requires_grad_(False)
    never = config.vocab_size  # an id no model can emit: stop tokens off, every canvas is generated
    tokenizer = PromptTokenizer(build_byte_tokenizer(config.vocab_size), None, (never,), config.pad_token_id, None)
    defaults = GenerationDefaults(stop_token_ids=(never,))
    return LoadedModel(ours, config, tokenizer, defaults, Path(".")), reference


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=generator).tolist()


Tokens = list[tuple[int, ...]]


def ours_runner(loaded: LoadedModel, prompts: list[list[int]], steps: int, new_tokens: int,
                compile_sampler: bool | None, compile_step: bool, compile_encoder: bool | None = None,
                record: Tokens | None = None) -> Callable[[], int]:
    """A closure that runs the batch through one Engine (built once) and returns the forwards it ran; `record`
    receives the committed canvases of its last run (request order, then canvas order)."""
    options: dict[str, Any] = {"compile_step": compile_step} if has_compile_step() else {}
    if compile_step and compile_encoder is not None:
        options["compile_encoder"] = compile_encoder
    config = EngineConfig(max_canvases_in_flight=len(prompts), max_tokens_per_forward=sum(map(len, prompts)),
                          max_context=len(prompts[0]) + new_tokens, compile_sampler=compile_sampler, **options)
    engine = Engine(loaded, config)
    params = SamplingParams(max_new_tokens=new_tokens, max_denoising_steps=steps, fixed_steps=True, seed=1)

    def run() -> int:
        ids = [engine.add_request(EngineRequest(prompt_token_ids=tuple(prompt), params=params)) for prompt in prompts]
        forwards, canvases = 0, []
        while engine.has_unfinished():
            canvases += [(o.request_id, o.token_ids) for o in engine.step() if o.kind == "canvas"]
            stats = engine.last_step_stats
            forwards += int(stats.num_encoder_tokens > 0) + int(stats.num_denoising_canvases > 0)
        if record is not None:
            record[:] = [tokens for request in ids for rid, tokens in canvases if rid == request]
        return forwards

    return run


def reference_runner(reference: Any, prompts: list[list[int]], steps: int, new_tokens: int, never: int,
                     static_cache: bool = False) -> Callable[[], int]:
    """The reference's own `generate`; `static_cache` asks for its static cache, with which it compiles."""
    input_ids = torch.tensor(prompts, device=reference.device)
    canvases = -(-new_tokens // reference.config.canvas_length)
    cache_options = {"cache_implementation": "static"} if static_cache else {}

    def run() -> int:
        reference.generate(input_ids, max_new_tokens=new_tokens, max_denoising_steps=steps,
                           stability_threshold=1, confidence_threshold=1e-30, eos_token_id=[never], pad_token_id=0,
                           **cache_options)
        return canvases * (steps + 1)  # one encoder pass per canvas plus `steps` decoder passes

    return run


def measure(run: Callable[[], int], device: torch.device) -> tuple[float, int, int | None]:
    """(seconds, forwards, peak bytes) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    forwards = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, forwards, peak


Sample = tuple[float, int, int | None]


def bench_batch(runners: dict[str, Callable[[], int]], repeats: int, device: torch.device,
                warmups: dict[str, float] | None = None) -> dict[str, Sample | str]:
    """Warm each implementation up once (an implementation whose warm-up raises is reported by its error;
    `warmups` receives each warm-up's seconds, compiling included), then alternate timed runs; median seconds
    per implementation."""
    failed: dict[str, Sample | str] = {}
    warmups = {} if warmups is None else warmups
    for name, run in runners.items():
        try:
            started = time.perf_counter()
            run()
            warmups[name] = time.perf_counter() - started  # includes compiling, for compiled implementations
        except Exception as exc:  # noqa: BLE001 (e.g. the reference's compiled static cache on this device)
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    samples: dict[str, list[Sample]] = {name: [] for name in runners if name not in failed}
    for _ in range(repeats):
        for name in samples:
            samples[name].append(measure(runners[name], device))
    result: dict[str, Sample | str] = {}
    for name in runners:
        if name in failed:
            result[name] = failed[name]
            continue
        runs = samples[name]
        peaks = [p for _, _, p in runs if p is not None]
        result[name] = (statistics.median(s for s, _, _ in runs), runs[0][1], max(peaks) if peaks else None)
    return result


def make_runners(args: argparse.Namespace, loaded: LoadedModel, reference: Any, prompts: list[list[int]],
                 new_tokens: int, records: dict[str, Tokens]) -> dict[str, Callable[[], int]]:
    """The runners of `--impls`; each of ours records its last run's tokens in `records[impl]`."""
    compile_sampler = {"auto": None, "on": True, "off": False}[args.compile_sampler]
    compile_encoder = {"auto": None, "on": True, "off": False}[args.compile_encoder]
    never = loaded.config.vocab_size
    factories: dict[str, Callable[[], Callable[[], int]]] = {
        "ours": lambda: ours_runner(loaded, prompts, args.steps, new_tokens, compile_sampler, args.compile == "on",
                                    compile_encoder, records.setdefault("ours", [])),
        "ours-eager": lambda: ours_runner(loaded, prompts, args.steps, new_tokens, compile_sampler, False,
                                          record=records.setdefault("ours-eager", [])),
        "ours-compiled": lambda: ours_runner(loaded, prompts, args.steps, new_tokens, compile_sampler, True,
                                             compile_encoder, records.setdefault("ours-compiled", [])),
        "reference": lambda: reference_runner(reference, prompts, args.steps, new_tokens, never),
        "reference-static": lambda: reference_runner(reference, prompts, args.steps, new_tokens, never, True),
    }
    return {name: factories[name]() for name in args.impl_list}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    loaded, reference = build_models(args.preset, device, dtype, args.seed)
    canvas_length = loaded.config.canvas_length
    prompt_len = args.prompt_len or canvas_length
    new_tokens = args.canvases * canvas_length
    rows, ratios, token_checks = [], [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = make_prompts(batch, prompt_len, loaded.config.vocab_size, args.seed + batch)
        warmups: dict[str, float] = {}
        records: dict[str, Tokens] = {}
        results = bench_batch(make_runners(args, loaded, reference, prompts, new_tokens, records), args.repeats,
                              device, warmups)
        # Same seeds, same prompts: our implementations must commit the same tokens (fp32: exactly, so far).
        ran = [impl for impl in records if records[impl]]
        token_checks += [{"batch": batch, "impl": impl, "baseline": ran[0],
                          "equal": records[impl] == records[ran[0]]} for impl in ran[1:]]
        for impl, outcome in results.items():
            seconds, forwards, peak = outcome if isinstance(outcome, tuple) else (None, None, None)
            rows.append({"impl": impl, "preset": args.preset, "device": str(device), "batch": batch,
                         "steps_per_canvas": args.steps, "new_tokens": batch * new_tokens,
                         "tok_per_s": batch * new_tokens / seconds if seconds else None,
                         "ms_per_forward": 1000 * seconds / forwards if seconds and forwards else None,
                         "peak_mem_bytes": peak, "warmup_s": warmups.get(impl),
                         "error": outcome if isinstance(outcome, str) else None})
        timed = {impl: outcome[0] for impl, outcome in results.items() if isinstance(outcome, tuple)}
        for ours in (impl for impl in timed if impl.startswith("ours")):
            for baseline in (impl for impl in REFERENCES if impl in timed):
                # Equal token counts: the time ratio is the tok/s ratio.
                ratios.append({"batch": batch, "impl": ours, "baseline": baseline,
                               "speedup": timed[baseline] / timed[ours]})
    print_table(rows, ratios)
    for check in token_checks:
        print(f"batch {check['batch']:>3}: {check['impl']} tokens == {check['baseline']} tokens: {check['equal']}")
    report = {"rows": rows, "ratios": ratios, "token_checks": token_checks,
              "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "prompt_len": prompt_len, "torch": torch.__version__,
                           "threads": torch.get_num_threads()}}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def print_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    header = (f"{'impl':<18}{'batch':>6}{'steps':>6}{'tokens':>8}{'tok/s':>10}{'ms/fwd':>9}{'peak MiB':>10}"
              f"{'warm-up s':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["error"] is not None:
            print(f"{row['impl']:<18}{row['batch']:>6}  failed: {row['error']}")
            continue
        peak = "-" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.0f}"
        print(f"{row['impl']:<18}{row['batch']:>6}{row['steps_per_canvas']:>6}{row['new_tokens']:>8}"
              f"{row['tok_per_s']:>10.1f}{row['ms_per_forward']:>9.2f}{peak:>10}{row['warmup_s']:>11.1f}")
    for ratio in ratios:
        print(f"batch {ratio['batch']:>3}: {ratio['impl']} / {ratio['baseline']} = {ratio['speedup']:.2f}x")


if __name__ == "__main__":
    main()
