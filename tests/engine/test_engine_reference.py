"""Our engine against the `transformers` reference `generate()` on the same random weights.

Sampling randomness cannot be shared between the two (the reference draws from torch's global generator),
so the comparison uses settings under which the reference is deterministic given its starting canvases:
a temperature so low that softmax(z) is one-hot (sampling = argmax, every entropy is 0, so every position is
accepted and nothing is re-noised). The starting canvases of the reference are scripted to be ours. What
remains is everything else: prompt prefill (longer than the sliding window), decoder passes with
self-conditioning, the stable-and-confident stop, commit passes between canvases, stop tokens and padding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgtext.byte_tokenizer import build_byte_tokenizer
from dgtext.save_tokenizer import save_tokenizer_files
from engine import Engine, EngineConfig, EngineRequest, SamplingParams, load_model, rng
from engine.sampler import initial_canvas
from tests.support.checkpoints import TINY_TEXT_CONFIG, save_reference_checkpoint

transformers = pytest.importorskip("transformers")
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSampler  # noqa: E402

# C canvas length, V vocab, P prompt length

T_MIN, T_MAX = 1e-6, 2e-6  # z = logits / T: softmax is exactly one-hot in fp32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_reference_checkpoint(tmp_path_factory.mktemp("engine_vs_reference"), seed=3)
    save_tokenizer_files(build_byte_tokenizer(TINY_TEXT_CONFIG["vocab_size"]), folder)
    return folder


class ScriptedStartSampler(EntropyBoundSampler):
    """The reference sampler, except that each new canvas starts from the canvas we hand it."""

    def __init__(self, starts: list[torch.Tensor], *args) -> None:
        super().__init__(*args)
        self.starts = list(starts)

    def initialize_canvas(self, batch_size: int, device: torch.device) -> torch.LongTensor:
        return self.starts.pop(0)

    def renoise_canvas(self, accepted_canvas: torch.LongTensor, cur_step: int) -> torch.LongTensor:
        noise = torch.randint(0, self.vocab_size, accepted_canvas.shape)
        return torch.where(self.accepted_token_mask, accepted_canvas, noise)


def our_starting_canvases(seed: int, num_canvases: int, length: int, vocab: int) -> list[torch.Tensor]:
    no_clamp = torch.zeros(1, length, dtype=torch.bool)
    keys = [torch.tensor([rng.stream_key(seed, k, 0, rng.STREAM_INITIAL_CANVAS)]) for k in range(num_canvases)]
    return [initial_canvas(key, length, vocab, no_clamp, torch.zeros(1, length, dtype=torch.int64)) for key in keys]


def reference_tokens(folder: Path, prompt: list[int], max_new_tokens: int, steps: int, seed: int,
                     stop_ids: list[int]) -> list[int]:
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    length, vocab = model.config.canvas_length, model.config.text_config.vocab_size
    starts = our_starting_canvases(seed, -(-max_new_tokens // length), length, vocab)
    model._prepare_sampler = lambda config: ScriptedStartSampler(
        starts, config.sampler_config, length, vocab, config.max_denoising_steps)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, max_denoising_steps=steps,
                         t_min=T_MIN, t_max=T_MAX, stability_threshold=1, confidence_threshold=0.005,
                         eos_token_id=stop_ids, pad_token_id=0)
    new = out.sequences[0, len(prompt):].tolist()
    for index, token in enumerate(new):  # after the first stop the reference pads; we drop those positions
        if token in stop_ids:
            return new[:index + 1]
    return new


@pytest.mark.parametrize("seed, max_new_tokens, scenario", [
    (77, 32, "early stop, then a stop token mid-canvas"),
    (1, 64, "two canvases at the step cap, with a commit pass between them"),
])
def test_committed_tokens_equal_reference_generate(checkpoint: Path, seed: int, max_new_tokens: int,
                                                   scenario: str) -> None:
    loaded = load_model(checkpoint)
    window = loaded.config.sliding_window
    prompt = [2] + [40 + (7 * i) % 300 for i in range(window + 9)]  # longer than the sliding window
    stop_ids = list(loaded.generation_defaults.stop_token_ids)
    steps = 24
    engine = Engine(loaded, EngineConfig(max_canvases_in_flight=2, max_context=256))
    params = SamplingParams(seed=seed, max_new_tokens=max_new_tokens, max_denoising_steps=steps, t_min=T_MIN,
                            t_max=T_MAX, stability_threshold=1, confidence_threshold=0.005)
    steps_taken: list[int] = []
    (result,) = engine.generate([EngineRequest(prompt_token_ids=tuple(prompt), params=params)], max_steps=200,
                                on_output=lambda out: steps_taken.append(out.step) if out.kind == "canvas" else None)
    ours, reason = list(result.token_ids), result.finish_reason
    assert ours == reference_tokens(checkpoint, prompt, max_new_tokens, steps, seed, stop_ids)
    # check that the run exercised the scenario it is named for
    if seed == 77:
        assert steps_taken[0] < steps and reason == "stop" and len(ours) < loaded.config.canvas_length
    else:
        assert steps_taken == [steps, steps] and len(ours) == max_new_tokens and reason == "length"
