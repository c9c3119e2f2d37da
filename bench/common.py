"""Set-up shared by the benchmarks: the model and the exact batches the extractor runs, and their bare forward.

Import this after setting ``OMP_WAIT_POLICY`` (it imports torch, and OpenMP reads the policy once at start-up):
the CLI runs with PASSIVE, and so do the benchmarks that compare against it. Bench scripts are run as
``python bench/x.py``, so ``bench/`` is on ``sys.path`` and ``import common`` finds this module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from probecache.extract.config import ExtractConfig
from probecache.extract.datasets import load_dataset
from probecache.extract.plan import batches, make_plan, select_examples
from probecache.lm.models import load_model, resolve_device, resolve_dtype, resolve_model
from probecache.lm.tokens import pad_batch, pad_token_id


def bare_forward_seconds(model, shard_batches, pad_id: int) -> float:
    """The forward passes alone, hidden states requested and left on the device, nothing kept."""
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in shard_batches:
            ids, mask = pad_batch([p.token_ids for p in batch], pad_id, str(model.device))
            model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def prepare(dataset: str, data_dir: str | None, limit: int | None, model_spec: str, dtype: str, root: Path,
            **overrides):
    """The model and the exact batches the extractor will run for this config (``overrides``: more
    ExtractConfig fields, e.g. shard_size, which changes the batches: they never cross a shard)."""
    config = ExtractConfig(dataset=dataset, data_dir=data_dir, limit=limit, model=model_spec, dtype=dtype,
                           progress=False, root=str(root), **overrides)
    ds = load_dataset(dataset, data_dir=data_dir)
    device = resolve_device("auto")
    model, tokenizer = load_model(resolve_model(model_spec), resolve_dtype(dtype, device), device)
    plan = make_plan(select_examples(ds.splits, limit, config.seed), tokenizer, config)
    by_shard: dict[int, list] = {}
    for p in plan:
        by_shard.setdefault(p.shard_id, []).append(p)
    all_batches = [b for s in sorted(by_shard) for b in batches(by_shard[s], config.batch_tokens,
                                                                 config.max_batch_size)]
    pad_id = pad_token_id(tokenizer)
    bare_forward_seconds(model, all_batches[:2], pad_id)  # warm-up: allocator, kernels
    return config, model, all_batches, pad_id, device


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(file sizes, bytes allocated on the file system as `du` counts them) of everything under ``folder``:
    they differ for sparse files (a padded memmap's unwritten holes)."""
    size = allocated = 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            size += st.st_size
            allocated += st.st_blocks * 512
    return size, allocated


def evict_from_page_cache(folder: Path) -> None:
    """Drop every file under ``folder`` from the page cache (posix_fadvise DONTNEED: only these files, so a
    benchmark running beside this one keeps its cache), so the next read comes from the disk. On a VM the host
    may still serve it from its own cache (docs/BENCHMARKS.md, Machine)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
