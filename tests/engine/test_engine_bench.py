"""bench/engine_bench.py runs end to end on the tiny preset and writes the documented rows (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_bench.py"
ROW_KEYS = {"impl", "preset", "device", "batch", "steps_per_canvas", "new_tokens", "tok_per_s", "ms_per_forward",
            "peak_mem_bytes", "warmup_s", "error"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("engine_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_writes_rows_and_ratios(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batches", "1,2", "--steps", "2", "--canvases", "1", "--repeats", "1",
                "--impls", "ours-eager,ours,reference", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in report["rows"]] == [
        ("ours-eager", 1), ("ours", 1), ("reference", 1), ("ours-eager", 2), ("ours", 2), ("reference", 2)]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS and row["error"] is None
        assert row["new_tokens"] == row["batch"] * 32 and row["tok_per_s"] > 0 and row["ms_per_forward"] > 0
        assert row["warmup_s"] > 0
    assert [(r["batch"], r["impl"], r["baseline"]) for r in report["ratios"]] == [
        (1, "ours-eager", "reference"), (1, "ours", "reference"), (2, "ours-eager", "reference"),
        (2, "ours", "reference")]
    assert all(r["speedup"] > 0 for r in report["ratios"])
    # `ours` is eager here (--compile off): the same seeds and prompts must commit the same tokens
    assert report["token_checks"] == [{"batch": batch, "impl": "ours", "baseline": "ours-eager", "equal": True}
                                      for batch in (1, 2)]
    printed = capsys.readouterr().out
    assert "ours-eager / reference" in printed and "ours tokens == ours-eager tokens: True" in printed


def test_a_failing_implementation_is_reported_with_its_error(bench) -> None:
    def broken() -> int:
        raise NotImplementedError("no kernel for this device")

    result = bench.bench_batch({"reference-static": broken, "fine": lambda: 1}, repeats=1,
                               device=bench.torch.device("cpu"))
    assert result["reference-static"] == "NotImplementedError: no kernel for this device"
    assert isinstance(result["fine"], tuple) and result["fine"][1] == 1


def test_compile_flag_needs_the_compiled_step(bench, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "ours,nonsense"])
    assert "unknown implementation(s) ['nonsense']" in capsys.readouterr().err
    if bench.has_compile_step():
        assert bench.parse_args(["--compile", "on"]).compile == "on"
    else:  # until EngineConfig.compile_step exists the flag fails clearly instead of timing eager twice
        with pytest.raises(SystemExit):
            bench.parse_args(["--compile", "on"])
        assert "need EngineConfig.compile_step" in capsys.readouterr().err
        assert bench.parse_args(["--compile", "off", "--impls", "ours-eager"]).impl_list == ["ours-eager"]
