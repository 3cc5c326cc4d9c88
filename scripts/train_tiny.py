"""Train the small embedded DiffusionGemma-architecture model (issue 5) on the stdlib's own sources.

    OMP_NUM_THREADS=2 nice python -m scripts.train_tiny --out models/dgtiny --work /tmp/dgtiny-work

Steps: gather the corpus (training/corpus.py), train the byte-level BPE (training/tokenizer.py), then
train the engine's own `DiffusionGemmaModel` with the section-7 objective (training/objective.py) on a
mix of fully corrupted canvases and span-corrupted (edit-shaped) canvases (training/data.py). Loss and
held-out metrics are logged to stdout and `<work>/train_log.jsonl`; a resumable state is saved to
`<work>/state.pt` as it goes, and the final weights are exported in the released layout to `--out`.
Everything is derived from `--seed` (same seed, same thread count -> same weights).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dgtext.byte_tokenizer import BOS, EOS, PAD, TURN_CLOSE
from engine.checkpoint import initialise_random, save_checkpoint
from engine.config import FULL, SLIDING, ModelConfig
from engine.loader import load_model
from engine.model.transformer import DiffusionGemmaModel
from engine.types import GenerationDefaults
from training.corpus import load_split
from training.data import DataLayout, ExampleSampler, encode_streams, line_break_ids
from training.objective import (
    check_trainable_layout,
    diffusion_losses,
    learning_rate,
    make_optimizer,
)
from training.tokenizer import train_bpe_tokenizer

HELDOUT_BATCHES = 4


def dgtiny_config(tokenizer: Tokenizer, canvas_length: int = 32) -> ModelConfig:
    """The shipped shape: 4 layers (sliding, full, sliding, full), dense MLP + 8 experts top-2."""
    layer_types = (SLIDING, FULL, SLIDING, FULL)
    return ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        global_head_dim=64, num_global_key_value_heads=1, layer_types=layer_types, sliding_window=128,
        num_experts=8, top_k_experts=2, moe_intermediate_size=128, canvas_length=canvas_length,
        max_position_embeddings=8192, pad_token_id=tokenizer.token_to_id(PAD),
        eos_token_ids=(tokenizer.token_to_id(EOS), tokenizer.token_to_id(TURN_CLOSE)),
        bos_token_id=tokenizer.token_to_id(BOS))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/dgtiny"), help="released-layout output folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgtiny-work"), help="tokenizer, state, logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--span-fraction", type=float, default=0.5)
    parser.add_argument("--line-span-fraction", type=float, default=0.0,
                        help="share of span examples that fully corrupt one whole line (line infill, one-line edits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--max-minutes", type=float, default=55.0, help="stop early (and export) past this")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step with the schedule of --steps (replays a time-capped run)")
    parser.add_argument("--export-only", action="store_true", help="export <work>/state.pt to --out and exit")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from a saved state.pt or a released-layout model folder such as models/dgtiny "
                             "(a further phase: fresh optimizer and schedule)")
    # Sampler defaults written to generation_config.json. A model this small is best sampled at
    # temperature ~1: it was trained with self-conditioning on untempered logits, and the sampler feeds back
    # logits / T (measured on held-out infill, see models/dgtiny/README.md).
    parser.add_argument("--gen-t-min", type=float, default=0.95)  # transformers requires t_min < t_max
    parser.add_argument("--gen-t-max", type=float, default=1.0)
    parser.add_argument("--gen-steps", type=int, default=16, help="max_denoising_steps per canvas")
    parser.add_argument("--gen-max-new-tokens", type=int, default=128)
    parser.add_argument("--gen-entropy-bound", type=float, default=0.1, help="sampler_config.entropy_bound")
    return parser.parse_args(argv)


def load_or_train_tokenizer(work: Path, vocab_size: int) -> Tokenizer:
    path = work / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = train_bpe_tokenizer((f.text for f in load_split("train")), vocab_size=vocab_size)
    tokenizer.save(str(path))
    return tokenizer


def heldout_metrics(model: DiffusionGemmaModel, batches: list, seed: int) -> dict[str, float]:
    """Mean losses / denoising accuracy over fixed held-out batches (no gradients)."""
    generator = torch.Generator().manual_seed(seed)
    totals = {"canvas_ce": 0.0, "encoder_ce": 0.0, "canvas_accuracy": 0.0}
    with torch.no_grad():
        for batch in batches:
            losses = diffusion_losses(model, batch, generator)
            for key in totals:
                totals[key] += getattr(losses, key) / len(batches)
    return {f"heldout_{k}": round(v, 4) for k, v in totals.items()}


def initial_weights(source: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved state.pt, or of a released-layout folder read by the engine's own loader."""
    if source.is_dir():
        return load_model(source, dtype=torch.float32).model.state_dict()
    return torch.load(source)["model"]


def keep_freed_memory_in_process() -> None:
    """Ask glibc to serve allocations up to 32 MiB (its maximum) from the heap and never trim it.

    A training step frees and re-allocates the same vocabulary-sized tensors; served by fresh mmaps,
    every one of them page-faults its memory in again. No-op where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def export(model: DiffusionGemmaModel, config: ModelConfig, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
    defaults = GenerationDefaults(stop_token_ids=config.eos_token_ids, max_new_tokens=args.gen_max_new_tokens,
                                  max_denoising_steps=args.gen_steps, t_min=args.gen_t_min, t_max=args.gen_t_max,
                                  entropy_bound=args.gen_entropy_bound)
    save_checkpoint(model, config, args.out, tokenizer, defaults)


def train(args: argparse.Namespace) -> None:
    keep_freed_memory_in_process()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(args.work, args.vocab_size)
    config = dgtiny_config(tokenizer)
    check_trainable_layout(config, args.max_prompt_tokens)
    torch.manual_seed(args.seed)
    model = DiffusionGemmaModel(config)
    initialise_random(model, args.seed)
    state_path = args.work / "state.pt"
    if args.export_only:
        model.load_state_dict(torch.load(state_path)["model"])
        export(model, config, tokenizer, args)
        return
    if args.init_from is not None:
        model.load_state_dict(initial_weights(args.init_from))
    layout = DataLayout(config.canvas_length, args.max_prompt_tokens, config.vocab_size, config.pad_token_id,
                        config.bos_token_id, config.eos_token_ids[0], args.span_fraction, args.line_span_fraction,
                        line_break_ids(tokenizer))
    train_sampler = ExampleSampler(encode_streams(tokenizer, [f.text for f in load_split("train")], layout),
                                   layout, seed=args.seed)
    heldout_sampler = ExampleSampler(encode_streams(tokenizer, [f.text for f in load_split("heldout")], layout),
                                     layout, seed=args.seed + 1)
    heldout = [heldout_sampler.sample(args.batch_size) for _ in range(HELDOUT_BATCHES)]
    optimizer = make_optimizer(model, args.lr, weight_decay=0.01)
    sc_generator = torch.Generator().manual_seed(args.seed + 2)
    log_file = (args.work / "train_log.jsonl").open("a", encoding="utf-8")
    started = time.monotonic()
    print(f"params {sum(p.numel() for p in model.parameters())}, config {config}", flush=True)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        losses = diffusion_losses(model, train_sampler.sample(args.batch_size), sc_generator)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        record = {"step": step + 1, "minutes": round((time.monotonic() - started) / 60, 2),
                  "canvas_ce": round(losses.canvas_ce, 4), "encoder_ce": round(losses.encoder_ce, 4),
                  "canvas_accuracy": round(losses.canvas_accuracy, 4), "grad_norm": round(grad_norm, 3)}
        out_of_time = record["minutes"] > args.max_minutes or step + 1 == args.stop_after
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or out_of_time:
            record.update(heldout_metrics(model, heldout, args.seed + 3))
            torch.save({"model": model.state_dict(), "step": step + 1}, state_path)
        if (step + 1) % 20 == 0 or "heldout_canvas_ce" in record:
            print(json.dumps(record), flush=True)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if out_of_time:
            break
    export(model, config, tokenizer, args)


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
