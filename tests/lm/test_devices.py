"""`--device` checked in one place (lm/devices.py): every way a device can be missing is one line naming the fix, in
the calling stage's error type. The CUDA and MPS builds are simulated by patching what torch reports about itself
(this machine's torch is a CPU build), so each branch runs here."""

from __future__ import annotations

import pytest
import torch
from probecache.lm.devices import device_problem, resolve_device
from probecache.lm.errors import ModelError
from probecache.lm.models import resolve_device as resolve_device_of_models
from probecache.train.errors import TrainError


@pytest.fixture
def cuda_build(monkeypatch):
    """``set(n)``: torch reports a CUDA build with ``n`` visible devices."""

    def set_devices(n: int) -> None:
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_devices


def test_cpu_and_the_accepted_forms():
    assert resolve_device("cpu") == "cpu" and resolve_device(" cpu ") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "CUDA", "cuda:", "cuda:x", "gpu", ""):
        assert "is not one of auto, cpu, cuda, cuda:N or mps" in device_problem(bad), bad
    assert "one CPU device" in device_problem("cpu:1")


def test_a_cpu_build_asked_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        assert device_problem(spec) == (f"--device {spec}: this torch build has no CUDA (torch {torch.__version__}); "
                                        f"use --device cpu, or install a CUDA build of torch")


def test_a_cuda_build_without_the_device(cuda_build, monkeypatch):
    cuda_build(1)
    assert device_problem("cuda") is None and device_problem("cuda:0") is None
    assert device_problem("cuda:3") == ("--device cuda:3: only 1 CUDA device(s) are visible (cuda:0..cuda:0); pick "
                                        "one of those")
    cuda_build(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problem = device_problem("cuda")
    assert "no CUDA device is visible" in problem and "CUDA_VISIBLE_DEVICES=''" in problem and "--device cpu" in problem


def test_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    assert "this torch build has no MPS" in device_problem("mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "no MPS device is available" in device_problem("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_problem("mps") is None and "one MPS device" in device_problem("mps:1")


def test_each_stage_gets_its_own_error_type(cuda_build):
    cuda_build(1)
    with pytest.raises(ModelError, match="cuda:2"):
        resolve_device("cuda:2")  # the lm stage's default (extract and serve load models through it)
    with pytest.raises(TrainError, match="cuda:2"):
        resolve_device("cuda:2", TrainError)
    assert resolve_device("cuda:0", TrainError) == "cuda:0"
    assert resolve_device_of_models is resolve_device  # one check, re-exported where models are loaded
