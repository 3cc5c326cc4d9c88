"""bench/engine_bench.py runs end to end on the tiny preset and writes the documented rows (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_bench.py"
ROW_KEYS = {"impl", "preset", "device", "batch", "steps_per_canvas", "new_tokens", "tok_per_s", "ms_per_forward",
            "peak_mem_bytes"}


def test_engine_bench_writes_rows_and_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("engine_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batches", "1,2", "--steps", "2", "--canvases", "2", "--repeats", "1",
                "--json", str(out)])
    report = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in report["rows"]] == [("ours", 1), ("reference", 1), ("ours", 2),
                                                                 ("reference", 2)]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert row["new_tokens"] == row["batch"] * 2 * 32 and row["tok_per_s"] > 0 and row["ms_per_forward"] > 0
    assert [r["batch"] for r in report["ratios"]] == [1, 2]
    assert all(r["ratio_ours_over_reference"] > 0 for r in report["ratios"])
    assert "ours / reference" in capsys.readouterr().out
