"""probecache: cache every token x layer hidden state of a frozen LLM once, then train probes from it.

Public API (the CLI is built on the same calls):

    from probecache import ExtractConfig, open_store, run_extract
    result = run_extract(ExtractConfig(dataset="rotten_tomatoes", limit=64))
    store = open_store(result.store_path)
    store.manifest(split="train")                  # pyarrow Table, one row per example
    store.hidden(example_id, layers=[0, 15, 30])   # torch tensor (layers, n_tokens, d)
    open_store("s3://bucket/prefix/<store_id>")    # the same on object storage (docs/SHARING.md)

Names are imported lazily, so `import probecache` (and `probecache --help`) stays fast and does not
initialise torch before the CLI has configured its thread pool. The extraction function is `run_extract`:
`probecache.extract` is the extract stage's package (`probecache.extract.run.extract` is the same function).
"""

from importlib import import_module


def _version() -> str:
    """The installed distribution's version; from pyproject.toml when running from a checkout that is not
    installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("probecache")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        except OSError:
            found = None
        return found.group(1) if found else "0+unknown"


__version__ = _version()

# public name -> (module, name there)
_EXPORTS = {
    "ExtractConfig": "probecache.extract.config",
    "ExtractResult": "probecache.extract.run",
    "run_extract": "probecache.extract.run",
    "Store": "probecache.store.reader",
    "open_store": "probecache.store.reader",
    "list_stores": "probecache.store.reader",
    "push": "probecache.store.transfer",
    "pull": "probecache.store.transfer",
    "ProbedModel": "probecache.serve.probed",
    "TrainOptions": "probecache.train.options",
    "train_run": "probecache.train.runner",
    "evaluate_run": "probecache.train.runner",
}
_RENAMED = {"run_extract": "extract"}  # `extract` itself is the subpackage's name
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'probecache' has no attribute {name!r}")
