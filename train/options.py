"""What a training run is asked to do: the sweep grid and the run's options, as plain dataclasses.

Importable without torch, numpy, pyarrow or zarr: the CLI takes its defaults (and `--help` shows them) from these
classes, so no default is written twice. The modules that use them (sweep.py, runner.py) import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from probecache.cluster.dask_clusters import SlurmResources

from .choices import ALL_PROBES, CLASS_WEIGHTS, DEFAULT_RUNS_DIR, PROBE_KINDS, READOUTS
from .errors import TrainError

EXECUTORS = ("local", "dask")  # where a probe sweep's variants are fitted (train/distributed.py for dask)
DASK_MISSING = "--executor dask needs dask.distributed: pip install 'probecache[dask]'"


@dataclass(frozen=True)
class Grid:
    probe: str
    pools: Sequence[str] = ("mean",)
    norms: Sequence[str] = ("rms",)
    downcasts: Sequence[int] = (8,)
    heads: Sequence[int | None] = (None,)  # None: auto_heads
    lrs: Sequence[float] = ()  # empty: DEFAULT_LR[probe]
    weight_decays: Sequence[float] = (0.01,)
    batch_sizes: Sequence[int] = (32,)
    class_weights: Sequence[str] = ("none",)
    seeds: Sequence[int] = (0,)
    epochs: int = 10
    patience: int = 3


@dataclass
class TrainOptions:
    probe: str
    grid: Grid | None = None  # pooling / scoring / mha
    cs: tuple[float, ...] | None = None  # baselines: inverse regularisation strengths tried on validation
    # (None: DEFAULT_BASELINE_CS)
    readout: str = "mean"  # linear: per-layer pooled mean or last-token state
    class_weight: str = "none"  # baselines (probes take it from the grid)
    layers: list[int] | None = None
    metric: str | None = None  # None: F1 for safety-like label names, else accuracy
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = "test"
    validation_fraction: float = 0.1
    runs_dir: str = DEFAULT_RUNS_DIR
    device: str = "cpu"
    buffer_tokens: int = 65536
    progress: bool = True
    executor: str = "local"  # dask: a probe sweep's fitting split into --workers shares on a dask cluster
    workers: int = 2  # dask: how many shares (and LocalCluster worker processes without --scheduler)
    scheduler: str | None = None  # dask: a running scheduler's address (tcp://host:8786), "slurm" (dask-jobqueue
    # workers as SLURM jobs asking for ``slurm``), None = a LocalCluster
    slurm: SlurmResources = field(default_factory=SlurmResources)
    # token streams read through an uncompressed local copy of the blocks they use, up to this size (500M, 20G;
    # None or 0: off), kept under decoded_cache_dir (default $PROBECACHE_CACHE/decoded): store/decoded_cache.py
    decoded_cache: str | None = None
    decoded_cache_dir: str | None = None
    extra: dict = field(default_factory=dict)  # recorded in config.json under options (the CLI puts its argv)

    def __post_init__(self) -> None:
        if self.probe not in ALL_PROBES:
            raise TrainError(f"unknown probe {self.probe!r}: choose one of {', '.join(ALL_PROBES)}")
        if self.readout not in READOUTS:
            raise TrainError(f"--readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if self.class_weight not in CLASS_WEIGHTS:  # probes check theirs in TrainConfig; baselines use this one
            raise TrainError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}")
        bad = [c for c in self.cs or () if not (math.isfinite(c) and c > 0)]
        if bad:
            raise TrainError(f"--C must be a positive finite number, got {bad[0]}")
        self._check_executor()
        self._check_decoded_cache()
        from probecache.lm.devices import resolve_device  # torch: imported when options are made, not for --help

        self.device = resolve_device(self.device, TrainError)  # before any data is read: one line, not torch's assert

    def _check_decoded_cache(self) -> None:
        from probecache.store.decoded_cache import DecodedCache
        from probecache.store.errors import StoreError

        try:
            DecodedCache.from_option(self.decoded_cache, self.decoded_cache_dir)
        except StoreError:
            raise TrainError(f"--decoded-cache {self.decoded_cache!r}: give a size such as 500M or 20G (0: no cache)"
                             ) from None

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise TrainError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.workers < 1:
            raise TrainError(f"--workers must be a positive integer, got {self.workers}")
        if self.executor == "local":
            if self.scheduler:
                raise TrainError("--scheduler is for --executor dask: add --executor dask, or drop --scheduler")
            return
        if self.probe not in PROBE_KINDS:
            raise TrainError(f"--executor dask splits a probe sweep ({', '.join(PROBE_KINDS)}); the {self.probe} "
                             f"baseline is fitted in this process: drop --executor dask")
        if self.scheduler == "slurm":
            try:
                import dask_jobqueue  # noqa: F401
            except ImportError:
                raise TrainError("--scheduler slurm needs dask-jobqueue: pip install 'probecache[cluster]'") from None
        try:  # before any data is read: the missing extra is one line, not a traceback mid-run
            import dask.distributed  # noqa: F401
        except ImportError:
            raise TrainError(DASK_MISSING) from None
