"""FP8-dynamic checkpoints (compressed-tensors layout): dequantised at load they give the reference's logits on
the dequantised weights; kept in FP8 they run `torch._scaled_mm` (on CPU too) and match the same arithmetic done
by hand; other quantization formats are refused with the offending field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import Engine, EngineConfig, EngineRequest, SamplingParams
from engine.errors import MissingTensorsError, UnsupportedModelError
from engine.kv_cache import KVCache
from engine.loader import LoadedModel, load_model
from engine.model import fp8, moe
from engine.model.fp8 import FP8_DTYPE, FP8Linear, dequantize, quantize_rows, row_scales, scaled_linear
from tests.support.fp8_checkpoints import fp8_dynamic_config, write_fp8_pair

transformers = pytest.importorskip("transformers")
from tests.engine.test_model_parity import (  # noqa: E402 (needs transformers)
    ReferenceRow,
    denoise_batch,
    encode_batch,
    reference_from,
    relative_error,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[("channel", torch.float32), ("tensor", torch.bfloat16)],
                ids=["channel-fp32-scales", "tensor-bf16-scales"])
def fp8_pair(request, reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    strategy, scale_dtype = request.param
    return write_fp8_pair(reference_checkpoint, tmp_path_factory.mktemp(f"fp8_{strategy}"), strategy, scale_dtype)


def logits_of(loaded: LoadedModel, ref=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our encoder and decoder logits for two rows (and the reference's, if given), with self-conditioning."""
    cfg = loaded.config
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (7, 19)]
    cache = KVCache(cfg, num_slots=2, max_context=96)
    encoded = encode_batch(loaded, cache, prompts, [0, 0], [0, 1])
    canvases = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=gen)
    sc_logits = 3 * torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=gen)
    denoised = denoise_batch(loaded, cache, canvases, [7, 19], [0, 1], sc_logits)
    ours = [encoded[0, :7], encoded[1, :19], denoised[0], denoised[1]]
    if ref is None:
        return ours, []
    rows = [ReferenceRow(ref) for _ in prompts]
    theirs = [rows[0].encode(prompts[0]), rows[1].encode(prompts[1])]
    theirs += [rows[b].denoise(canvases[b], sc_logits[b]) for b in range(2)]
    return ours, theirs


@pytest.mark.slow
@torch.no_grad()
def test_dequantised_fp8_checkpoint_matches_the_reference_on_the_dequantised_weights(fp8_pair) -> None:
    fp8_dir, dense_dir = fp8_pair
    loaded = load_model(fp8_dir)  # CPU default: dequantise at load
    assert loaded.weights_format == "fp8-dequantized"
    assert all(t.dtype == torch.float32 for t in loaded.model.state_dict().values())
    dense = load_model(dense_dir).model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, dense[name]), name  # per-expert pieces landed in the packed experts exactly
    ours, theirs = logits_of(loaded, reference_from(dense_dir))
    for mine, ref in zip(ours, theirs, strict=True):
        assert relative_error(mine, ref) < TOLERANCE


def emulated_scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FP8 matmul's arithmetic by hand, in fp32: per-token quantised activations times dequantised weights."""
    q, q_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return ((q.float() * q_scale) @ (weight.float() * scale[:, None]).T).view(*x.shape[:-1], -1)


@pytest.mark.slow
@torch.no_grad()
def test_fp8_kept_weights_run_scaled_mm_as_the_arithmetic_by_hand(fp8_pair, monkeypatch) -> None:
    fp8_dir, _ = fp8_pair
    kept = load_model(fp8_dir, fp8_weights=True)
    assert kept.weights_format == "fp8"
    layer = kept.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, FP8Linear) and layer.self_attn.q_proj.weight.dtype == FP8_DTYPE
    assert layer.experts.is_fp8 and layer.experts.gate_up_proj.dtype == FP8_DTYPE
    assert not isinstance(layer.router.proj, FP8Linear)  # ignored by the scheme: shipped without a scale
    with_scaled_mm = logits_of(kept)[0]
    dequantised = logits_of(load_model(fp8_dir, fp8_weights=False))[0]
    # The oracle: the same model with every FP8 matmul (Linears and experts) done by hand in fp32.
    monkeypatch.setattr(fp8, "scaled_linear", emulated_scaled_linear)
    monkeypatch.setattr(moe, "scaled_linear", emulated_scaled_linear)
    by_hand = logits_of(kept)[0]
    for got, want, dense in zip(with_scaled_mm, by_hand, dequantised, strict=True):
        assert relative_error(got, want) < TOLERANCE
        # Per-token FP8 activations (3 mantissa bits) really change a random model's logits.
        assert relative_error(got, dense) > 1e-2


def test_scaled_linear_is_the_per_token_quantised_product() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen)
    x[0, 0] = 0  # an all-zero token must not divide by zero
    weight = torch.randn(48, 64, generator=gen)
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    fp8 = (weight / scale).to(FP8_DTYPE)
    got = scaled_linear(x, fp8, row_scales(scale, 48))
    q, q_scale = quantize_rows(x.reshape(-1, 64))
    by_hand = (q.float() * q_scale) @ (fp8.float() * scale).T
    assert got.shape == (3, 5, 48) and torch.allclose(got.reshape(-1, 48), by_hand, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0], torch.zeros(48))
    assert relative_error(got, x @ weight.T) < 0.1


def test_row_scales_accepts_channel_and_tensor_scales() -> None:
    assert torch.equal(row_scales(torch.tensor([[2.0], [3.0]]), 2), torch.tensor([2.0, 3.0]))
    assert torch.equal(row_scales(torch.tensor([2.0, 3.0]), 2), torch.tensor([2.0, 3.0]))
    assert torch.equal(row_scales(torch.tensor(4.0), 3), torch.full((3,), 4.0))
    assert torch.equal(row_scales(torch.tensor([4.0]), 3), torch.full((3,), 4.0))
    assert row_scales(torch.ones(5, 7, 1), 7).shape == (5, 7)
    with pytest.raises(ValueError, match="one scale per output row"):
        row_scales(torch.ones(3, 1), 4)
    fp8 = torch.ones(2, 3).to(FP8_DTYPE)
    assert torch.equal(dequantize(fp8, torch.tensor([[0.5], [2.0]]), torch.bfloat16),
                       torch.tensor([[0.5] * 3, [2.0] * 3], dtype=torch.bfloat16))


@pytest.mark.slow
def test_fp8_engine_generates_the_dequantised_checkpoints_tokens(fp8_pair) -> None:
    fp8_dir, dense_dir = fp8_pair
    params = SamplingParams(max_new_tokens=32, max_denoising_steps=3, fixed_steps=True, seed=7)
    tokens = {}
    for name, folder in (("fp8", fp8_dir), ("dense", dense_dir)):
        engine = Engine(load_model(folder), EngineConfig(max_canvases_in_flight=2))
        request_id = engine.add_request(EngineRequest(prompt_token_ids=(5, 9, 11, 40), params=params))
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        tokens[name] = [o.token_ids for o in outputs if o.request_id == request_id and o.kind == "canvas"]
    assert tokens["fp8"] == tokens["dense"] and len(tokens["fp8"][0]) == 32


def test_an_fp8_weight_or_scale_missing_its_partner_is_named(fp8_pair, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(fp8_pair[0], tmp_path / "ckpt"))
    original = load_file(folder / "model.safetensors")
    for dropped in ("model.decoder.layers.1.experts.3.up_proj.weight_scale",
                    "model.decoder.layers.4.self_attn.o_proj.weight"):
        save_file({k: v for k, v in original.items() if k != dropped}, str(folder / "model.safetensors"))
        partner = dropped.removesuffix("_scale") if dropped.endswith("_scale") else dropped + "_scale"
        with pytest.raises(MissingTensorsError, match=dropped.replace(".", r"\.") + r"(\W|$)"):
            load_model(folder)
        assert partner in original


UNSUPPORTED = {
    "gptq": ({"quant_method": "gptq", "bits": 4}, r"quant_method 'gptq' is not supported"),
    "fp8 blocks": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"quant_method 'fp8'"),
    "int4 packed": ({**fp8_dynamic_config(), "format": "pack-quantized",
                     "config_groups": {"g": {**fp8_dynamic_config()["config_groups"]["group_0"],
                                             "format": "pack-quantized"}}},
                    r"config_groups\.g\.format 'pack-quantized'"),
    "group scales": ({**fp8_dynamic_config(), "config_groups": {"g": {
        **fp8_dynamic_config()["config_groups"]["group_0"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}}},
        r"weights\.strategy 'group'"),
    "static activations": ({**fp8_dynamic_config(), "config_groups": {"g": {
        **fp8_dynamic_config()["config_groups"]["group_0"],
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}},
        r"input_activations\.dynamic is False"),
    "int8 weights": ({**fp8_dynamic_config(), "config_groups": {"g": {
        **fp8_dynamic_config()["config_groups"]["group_0"],
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}, r"weights\.type is 'int'"),
    "kv cache": ({**fp8_dynamic_config(), "kv_cache_scheme": {"num_bits": 8}}, r"kv_cache_scheme"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_quantization_formats_are_refused(case: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    quantization, message = UNSUPPORTED[case]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(folder)


@pytest.mark.slow
def test_fp8_kept_weights_trace_whole_under_torch_compile(fp8_pair) -> None:
    """FP8 Linears (`torch._scaled_mm`) and FP8 experts compile with fullgraph=True (aot_eager: the trace inductor
    and CUDA graphs would get): the experts' eager loop reads group bounds on the host, so under compilation
    they run every expert densely, and the grouped-matmul probes are read, not traced. Same logits as eager."""
    fp8_dir, _ = fp8_pair
    kept = load_model(fp8_dir, fp8_weights=True)
    model, config = kept.model, kept.config
    assert model.layers[0].experts.is_fp8
    cache = KVCache(config, num_slots=2, max_context=96)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (16,), generator=gen) for _ in range(2)]
    encode_batch(kept, cache, prompts, [0, 0], [0, 1])
    canvas = torch.randint(0, config.vocab_size, (2, config.canvas_length), generator=gen)
    positions = torch.arange(config.canvas_length).repeat(2, 1) + 16
    slots, context_lens = torch.tensor([0, 1]), torch.tensor([16, 16])

    def denoise(ids: torch.Tensor) -> torch.Tensor:
        return model.denoise(ids, positions, cache, slots, context_lens, None, context_bound=96)

    moe.probe_expert_kernels(torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        want = denoise(canvas)
        got = torch.compile(denoise, fullgraph=True, dynamic=False, backend="aot_eager")(canvas)
    assert relative_error(got, want) < 1e-6
