"""``--device``: the one check of a torch device spec, for every stage that puts tensors somewhere.

Extraction and serving run the model, training and evaluation run probes; all take ``--device auto | cpu |
cuda[:N] | mps``. Asking for a device this machine or this torch build lacks must be one line that names the fix,
never torch's own assertion from deep inside the first ``.to(device)`` ("Torch not compiled with CUDA enabled",
"invalid device ordinal"). Each stage raises its own error type (``error=``), so the CLI shows the message the
same way for all of them.

Only torch is imported (no transformers): the train stage, which never imports transformers, uses this too.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import ModelError

_SPEC = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")
_FORMS = "auto, cpu, cuda, cuda:N or mps"


def device_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be used on this machine with this torch build (one line naming the fix), or None."""
    match = _SPEC.match(spec)
    if match is None:
        return f"--device {spec!r} is not one of {_FORMS}"
    kind, index = match.group(1), match.group(2)
    build = f"torch {torch.__version__}"
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return (f"--device {spec}: this torch build has no CUDA ({build}); use --device cpu, or install a CUDA "
                    f"build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            return f"--device {spec}: no CUDA device is visible ({build}{where}); use --device cpu"
        if index is not None and int(index) >= count:
            return (f"--device {spec}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}); pick one "
                    f"of those")
    elif kind == "mps":
        if not torch.backends.mps.is_built():
            return f"--device {spec}: this torch build has no MPS (Apple GPU) support ({build}); use --device cpu"
        if not torch.backends.mps.is_available():
            return (f"--device {spec}: no MPS device is available (it needs macOS 12.3+ on Apple silicon); use "
                    f"--device cpu")
        if index not in (None, "0"):
            return f"--device {spec}: there is one MPS device; use --device mps"
    elif index not in (None, "0"):
        return f"--device {spec}: there is one CPU device; use --device cpu"
    return None


def resolve_device(spec: str, error: type[Exception] = ModelError) -> str:
    """``spec`` checked against this machine (``auto``: cuda when a CUDA device is visible, else cpu); raises
    ``error`` (the calling stage's user error) with the fix when it cannot be used."""
    spec = str(spec).strip()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_problem(spec)
    if problem is not None:
        raise error(problem)
    return spec
