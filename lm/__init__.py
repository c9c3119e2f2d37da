"""lm stage: the frozen language model both phases run, and how text becomes its input (below extract and serve).

    from probecache.lm import Tokenisation, encode, load_model, resolve_model
    source = resolve_model("smollm2-135m")            # a local HF folder + the weights' identity
    model, tokenizer = load_model(source, torch.bfloat16, "cpu")
    ids, lengths = encode(["a prompt"], tokenizer, Tokenisation("raw", "right", 512))

Modules: ``models`` (resolving ``--model`` to a folder, converting a GGUF once into the cache, dtype, loading, the
tokenizer's identity), ``devices`` (the one ``--device`` check; torch only, so train uses it too), ``tokens``
(Tokenisation, encode, truncation, padding), ``errors`` (ModelError). Extraction and serving both tokenise and pad
through here, so a served prompt is tokenised byte for byte as the stored one was. This package imports no other
probecache stage.

The constants below are plain values so that the CLI can show defaults without importing torch; other names
are imported lazily.
"""

from importlib import import_module

DEFAULT_MODEL = "smollm2-135m"  # an alias of models.EMBEDDED_MODELS
PROMPT_FORMATS = ("raw", "chat")  # raw text with the tokenizer's special tokens | chat template + generation prompt
TRUNCATION_SIDES = ("right", "left")  # right keeps a long text's beginning, left its end

_EXPORTS = {
    "ModelError": "probecache.lm.errors",
    "ModelSource": "probecache.lm.models",
    "cache_dir": "probecache.lm.models",
    "load_model": "probecache.lm.models",
    "resolve_device": "probecache.lm.devices",
    "resolve_dtype": "probecache.lm.models",
    "resolve_model": "probecache.lm.models",
    "tokenizer_identity": "probecache.lm.models",
    "Tokenisation": "probecache.lm.tokens",
    "encode": "probecache.lm.tokens",
    "pad_batch": "probecache.lm.tokens",
    "pad_token_id": "probecache.lm.tokens",
    "truncate": "probecache.lm.tokens",
}
__all__ = sorted([*_EXPORTS, "DEFAULT_MODEL", "PROMPT_FORMATS", "TRUNCATION_SIDES"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probecache.lm' has no attribute {name!r}")
