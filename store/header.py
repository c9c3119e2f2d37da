"""store.json: the store's identity and provenance, sealed with a checksum and checked on every open.

Every reader trusts a few header fields to interpret raw bytes: ``logical_dtype`` (uint16 bits are bf16),
``model.n_layers`` and ``model.hidden_size`` (array shapes), ``dataset.label_names`` (what label 1 means).
A hand edit or a flipped bit in any of them used to give wrong numbers with exit code 0. So the writer seals
the header: ``sha256`` is the hash of the canonical JSON of every other field, and ``read_header`` refuses a
header whose hash, required fields or store id do not hold. Headers written before the seal existed carry no
``sha256`` and are still read; for them (and for any header) the reader also cross-checks these fields
against the arrays and the manifest (reader.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from .codecs import LOGICAL_DTYPES
from .errors import StoreError
from .layout import FORMAT_VERSION, STORE_JSON, canonical_json, sha256_hex, store_id_for
from .token_policy import PATTERN as TOKEN_POLICY

SEAL = "sha256"


def seal_header(header: dict) -> bytes:
    """The bytes of store.json: the header plus the sha256 of its canonical JSON."""
    body = {k: v for k, v in header.items() if k != SEAL}
    return json.dumps({**body, SEAL: sha256_hex(canonical_json(body))}, indent=1).encode()


def parse_header(raw: bytes, where: str) -> dict:
    """A store.json's bytes -> its checked header; StoreError naming ``where`` and the fix otherwise."""
    damaged = f"{where} is damaged"
    fix = "restore it from a copy of the store (e.g. `probecache store pull`) or re-extract into a new root"
    try:
        info = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise StoreError(f"{damaged} (not valid JSON: {e.__class__.__name__} at byte {getattr(e, 'pos', '?')}): "
                         f"{fix}") from None
    if not isinstance(info, dict):
        raise StoreError(f"{damaged} (not a JSON object): {fix}")
    if info.get("format_version") != FORMAT_VERSION and isinstance(info.get("format_version"), int):
        raise StoreError(f"{where}: store format {info['format_version']} is not supported (this probecache reads "
                         f"format {FORMAT_VERSION}): upgrade probecache")
    if SEAL in info:
        body = {k: v for k, v in info.items() if k != SEAL}
        if info[SEAL] != sha256_hex(canonical_json(body)):
            raise StoreError(f"{damaged} (its fields do not match the checksum written with it: edited by hand?): "
                             f"{fix}")
    problem = _shape_problem(info)
    if problem:
        raise StoreError(f"{damaged} ({problem}): {fix}")
    return info


def read_header(folder: Path) -> dict:
    """The checked header of the store folder ``folder``; StoreError when it is not a store or is damaged."""
    path = Path(folder) / STORE_JSON
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise StoreError(f"{folder} is not a probecache store (no store.json): pass <root>/<store_id>") from None
    except PermissionError:
        raise StoreError(f"{path} cannot be read (permission denied): check the store's permissions") from None
    return parse_header(raw, str(path))


def _shape_problem(info: dict) -> str | None:
    """What a reader needs from the header, present and of the right type (None when all is well)."""
    model, dataset, plan = info.get("model"), info.get("dataset"), info.get("plan")
    if info.get("format_version") != FORMAT_VERSION:
        return "no format_version"
    if not isinstance(info.get("store_id"), str) or not isinstance(info.get("identity"), dict):
        return "no store_id or identity"
    if info.get("logical_dtype") not in LOGICAL_DTYPES:
        return f"logical_dtype {info.get('logical_dtype')!r} is not one of {', '.join(LOGICAL_DTYPES)}"
    if not isinstance(model, dict) or not all(_positive_int(model.get(k)) for k in ("n_layers", "hidden_size")):
        return "model.n_layers / model.hidden_size missing or not positive integers"
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str):
        return "no dataset name"
    names = dataset.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return "dataset.label_names is not a list of distinct strings"
    if not isinstance(plan, dict) or not all(isinstance(plan.get(k), int) for k in ("n_shards", "n_examples")):
        return "no plan summary"
    if not isinstance(info.get("capture"), dict):
        return "no capture set"
    kept = info["identity"].get("layers", "all")
    if kept != "all" and (not isinstance(kept, list) or not kept or kept != sorted(set(kept)) or not all(
            _index_below(i, model["n_layers"]) for i in kept)):
        return f"identity.layers {kept!r} is not 'all' or an ascending list of layers in 0..{model['n_layers'] - 1}"
    tokens = info["capture"].get("tokens", "all")
    if not isinstance(tokens, str) or not TOKEN_POLICY.match(tokens):
        return f"capture.tokens {tokens!r} is not a token policy"
    if info["store_id"] != store_id_for(info["identity"], dataset["name"]):
        return "its store_id is not the hash of its identity"
    return None


def stored_layers(info: dict) -> list[int]:
    """The model layers a (checked) header says its store holds, ascending: position i of every per-layer array is
    model layer ``stored_layers(info)[i]`` (all L+1 unless extracted with --layers)."""
    kept = info["identity"].get("layers", "all")
    return list(range(info["model"]["n_layers"])) if kept == "all" else list(kept)


def _index_below(value: object, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def label_name_mismatch(label_names: list[str], labels: list, names: list) -> tuple[int, str] | None:
    """The first (label, manifest label_name) pair that store.json's ``label_names`` contradicts, or None.
    Every manifest row carries its label's name: swapped or edited names in the header would otherwise
    invert every metric and every served label without a word."""
    pairs = {(label, name) for label, name in zip(labels, names, strict=True) if label is not None and name is not None}
    wrong = sorted(p for p in pairs if not 0 <= p[0] < len(label_names) or label_names[p[0]] != p[1])
    return wrong[0] if wrong else None
