"""Smoke test of bench/gpu.py on the tiny shape on CPU: every measurement present, sane, and its stores deleted.

The GPU run itself needs a GPU host (docs/BENCHMARKS.md); this checks the script's own code paths: the random
model folder with SmolLM2's tokenizer, the interleaved sweep over encode threads through extract(), the
encode-pool measurement and gpu.json. No wall-clock thresholds: at this size timings are noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # the tokenizer is the embedded SmolLM2's (converted once per machine)



def test_gpu_bench_tiny_on_cpu(all_finite, tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--shape", "tiny", "--device", "cpu", "--limit", "40",
           "--encode-threads", "0", "--encode-threads", "2", "--encode-seconds", "0.3",
           "--scratch", str(scratch), "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())

    assert all_finite(report)
    assert report["host"]["device"] == "cpu" and report["host"]["cpu_count"] >= 1
    assert report["model"]["layers"] == 3 and report["model"]["bytes_per_token"] == 4 * 64 * 2  # (L+1) d bf16
    assert report["dataset"]["examples"] == 40 and report["dataset"]["tokens"] > 0

    # two repeats, the second in reverse order; every run wrote every token and was measured
    assert [r["encode_threads"] for r in report["runs"]] == [0, 2, 2, 0]
    for r in report["runs"]:
        assert r["tokens"] == report["dataset"]["tokens"]
        assert r["bare_s"] > 0 and r["loop_s"] > 0 and r["loop_cpu_s"] >= 0
        assert 0 < r["hidden_bytes_stored"] < r["hidden_bytes_raw"] == r["tokens"] * 4 * 64 * 2
    assert [s["encode_threads"] for s in report["summary"]] == [0, 2]
    for s in report["summary"]:
        assert s["repeats"] == 2
        assert s["extract_tokens_per_s"] > 0 and s["bare_tokens_per_s"] > 0 and s["overhead_ratio"] > 0
        assert s["compressed_gb_per_s"] > 0 and s["compression_ratio"] > 1

    assert [e["threads"] for e in report["encode"]][0] == 1
    assert all(e["gb_per_s"] > 0 and e["compression_ratio"] > 1 for e in report["encode"])
    assert report["keep_up"]["threads_linear_estimate"] >= 1

    assert not (scratch / "stores").exists()  # every store deleted
    assert (scratch / "model-tiny" / "model.safetensors").is_file()  # kept for a rerun under the same --scratch
    assert "| encode threads | extraction tok/s |" in run.stdout and "| pool threads | GB/s |" in run.stdout
