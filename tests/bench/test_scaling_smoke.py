"""Smoke test of bench/scaling.py on the tiny model: every point measured, sane, and its stores deleted.

No wall-clock thresholds: timings on a shared machine are noise at this size; what is checked is that every
size and length point was extracted, measured and normalised, and that length points really are T tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = [32, 64]  # smaller --limit samples of rotten_tomatoes have a one-class train split
LENGTHS = [16, 32]



def test_scaling_on_tiny_model(all_finite, tiny_model, tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    # Not --quick: explicit tiny sizes are as fast, and the full path also times the interleaved forward.
    cmd = [sys.executable, str(REPO / "bench" / "scaling.py"), "--model", str(tiny_model),
           "--dtype", "fp32", "--device", "cpu", "--sizes", ",".join(map(str, SIZES)),
           "--lengths", ",".join(map(str, LENGTHS)), "--budget", "128", "--out", str(out), "--scratch", str(scratch)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "scaling.json").read_text())

    assert all_finite(report)
    assert [p["examples"] for p in report["sizes"]] == SIZES
    for p in report["sizes"]:
        assert p["tokens"] > 0 and p["disk_bytes"] > 0 and p["bytes_stored_arrays"] > 0
        assert p["train"]["tokens_per_epoch"] > 0
        assert all(p["train"][probe]["epoch_s"] > 0 for probe in ("scoring", "mha"))
        assert all(v > 0 for v in p["per_token_vs_first"].values())
    assert all(v == 1.0 for v in report["sizes"][0]["per_token_vs_first"].values())
    assert set(report["size_fits"]) >= {"extract_loop_s_vs_tokens", "disk_bytes_vs_tokens"}

    assert [p["T"] for p in report["lengths"]] == LENGTHS
    for p in report["lengths"]:
        t = p["T"]
        assert p["n_tokens_min"] == p["n_tokens_max"] == t  # truncation made every example exactly T tokens
        assert p["tokens"] == p["examples"] * t == p["padded_tokens"]  # hence no padding either
        assert p["examples"] == 128 // t
        assert p["overhead_ratio"] > 0 and p["disk_bytes"] > 0
        assert p["bare_forward_tokens_per_s"] > 0 and p["bare_interleaved_tokens_per_s"] > 0
        assert p["read"]["decode_amplification"] >= 1
        assert all(v > 0 for v in p["per_token_vs_first"].values())

    assert not any(scratch.iterdir())  # every store (and the synthesised CSVs) deleted
    assert "| metric | x1 | x2 |" in run.stdout and "| metric | T = 16 | T = 32 |" in run.stdout


def test_scaling_rss_on_tiny_model(all_finite, tiny_model, tmp_path):
    """`bench/scaling.py --rss`: memory, loader and the parity epochs (store, decoded cache, torch.save) per size,
    every number finite, the cache really read, and the stores and scratch files deleted."""
    out, stores = tmp_path / "out", tmp_path / "stores"
    cmd = [sys.executable, str(REPO / "bench" / "scaling.py"), "--rss", "--model", str(tiny_model),
           "--limits", ",".join(map(str, SIZES)), "--layers", "1,2", "--buffer-tokens", "64", "--repeats", "1",
           "--parity-repeats", "1", "--cold", "--stores", str(stores), "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "scaling_rss.json").read_text())
    assert all_finite(report)
    for point in report["points"]:
        assert point["scoring"]["peak_rss_mb"] > 0 and point["mha"]["peak_held_tokens"] > 0
        parity = point["parity"]
        assert parity["cache_build"]["cache"]["written"] > 0 and parity["cache_bytes"] > 0
        assert parity["torch_save_bytes"] > 0
        assert all(parity[name]["median_s"] > 0 for name in ("store", "cache", "torch_save"))
        assert len(parity["ratios"]["cache"]) == 1 and parity["cache"]["written"] == 0  # the timed epoch read it
    assert not stores.exists() or not any(stores.iterdir())
    assert "decoded cache / torch.save" in run.stdout
