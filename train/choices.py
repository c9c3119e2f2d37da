"""The train stage's option vocabularies, importable without torch, numpy, pyarrow or zarr.

`probecache train --help` names these choices, so they live apart from the modules that use them (each of
those re-exports its own names from here).
"""

import os

PROBE_KINDS = ("pooling", "scoring", "mha")  # the keys of probes.PROBES (a test keeps them equal)
BASELINES = ("linear", "muli", "tfidf")
ALL_PROBES = (*PROBE_KINDS, *BASELINES)
READOUTS = ("mean", "last")
POOLS = ("mean", "max")
NORMS = ("none", "rms")
CLASS_WEIGHTS = ("none", "balanced")
METRICS = ("f1", "accuracy")
DEFAULT_RUNS_DIR = "runs"


def default_runs_dir() -> str:
    return os.environ.get("PROBECACHE_RUNS") or DEFAULT_RUNS_DIR
