"""probecache: cache every token x layer hidden state of a frozen LLM once, then train probes from it.

Public API (the CLI is built on the same calls):

    from probecache import ExtractConfig, extract, open_store
    result = extract(ExtractConfig(dataset="rotten_tomatoes", limit=64))
    store = open_store(result.store_path)
    store.manifest(split="train")                  # pyarrow Table, one row per example
    store.hidden(example_id, layers=[0, 15, 30])   # torch tensor (layers, n_tokens, d)
    open_store("s3://bucket/prefix/<store_id>")    # the same on object storage (docs/SHARING.md)

Names are imported lazily, so `import probecache` (and `probecache --help`) stays fast and does not
initialise torch before the CLI has configured its thread pool.
"""

from importlib import import_module

_EXPORTS = {
    "ExtractConfig": "probecache.extract.config",
    "ExtractResult": "probecache.extract.run",
    "extract": "probecache.extract.run",
    "Store": "probecache.store.reader",
    "open_store": "probecache.store.reader",
    "list_stores": "probecache.store.reader",
    "push": "probecache.store.transfer",
    "pull": "probecache.store.transfer",
    "ProbedModel": "probecache.serve.probed",
    "TrainOptions": "probecache.train.runner",
    "train_run": "probecache.train.runner",
    "evaluate_run": "probecache.train.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probecache' has no attribute {name!r}")
