"""Trained runs as the serving stage sees them, and the checks that let several share one forward pass.

A run folder (``docs/TRAINING.md``) holds ``config.json`` (what the probe reads and the store's provenance) and
``probe.safetensors``. :func:`load_run` turns it into a :class:`ServedRun`: the probe (or baseline) plus what
serving needs from the config: which hidden-state indices it reads, its label names and decision threshold,
and how its training prompts were tokenised.

What can ride the forward pass:

- ``pooling`` / ``scoring`` / ``mha``: stage 1 per layer inside the hooks, stage 2 + head after the pass.
- ``linear``: one layer's masked mean (float32 accumulation, as the extractor's pooled tier) or last-token state.
- ``muli``: the next-token logits at the last prompt position: the LM head applied to the final state of that
  position only (what the extractor stores), never over every position.
- ``tfidf`` is refused: it reads the raw text, not the model, so it has nothing to gain from the pass.

Several runs share a pass only if they were trained on stores of the same model (weights id) and the same
tokenisation (tokenizer and chat-template hashes, prompt format, truncation side). ``max_tokens`` may differ
when every run truncates on the right: causal attention makes the first N tokens' states independent of what
follows, so each run reads only its own first ``max_tokens`` tokens of one common pass. With left truncation
the kept tokens' states depend on where the cut is, so the runs must agree on it.

Serving needs only the run folder. When the run's store is still where training found it (a local folder with the
same store id), its label names are checked against the run's: a store.json whose label names were reordered
(before training, caught by its manifests' recorded names, or after) would invert every served label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from probecache.lm.tokens import Tokenisation
from probecache.store.token_policy import TokenPolicy, TokenPolicyError, parse_token_policy
from probecache.train.baselines import LogisticModel
from probecache.train.probes import PROBES, Probe, check_safetensors, load_probe
from probecache.train.runs import read_json
from probecache.train.trainer import probabilities

from .errors import ServeError

SERVABLE = (*PROBES, "linear", "muli")
TOKENISATION_KEYS = ("prompt_format", "truncation_side", "tokenizer_sha256", "chat_template_sha256")


@dataclass
class ServedRun:
    """One probe or baseline ready to read hidden states; build with :func:`load_run` or directly (benchmarks)."""

    name: str  # key of this run in every result (default: the run folder's name)
    kind: str  # pooling | scoring | mha | linear | muli
    layers: list[int]  # hidden-state indices read, in the probe's block order (0 = embedding output)
    label_names: list[str]
    threshold: float | None  # binary: P(label_names[1]) >= threshold -> label_names[1]; None for multiclass
    store: dict  # the run's config.json "store" block: model, weights, dtype, tokenisation, shapes
    probe: Probe | None = None  # pooling / scoring / mha
    baseline: LogisticModel | None = None  # linear / muli
    readout: str = "mean"  # linear: "mean" over the prompt's tokens or the "last" token's state
    path: Path | None = None
    config: dict = field(default_factory=dict)

    @property
    def binary(self) -> bool:
        return len(self.label_names) == 2

    @property
    def max_tokens(self) -> int | None:
        return self.store.get("max_tokens")

    @property
    def tokens(self) -> TokenPolicy:
        """The tokens of each prompt the probe was trained on (``extract --tokens``; all for pooled-mean probes and
        baselines, whose stored means cover every token)."""
        return parse_token_policy(self.config.get("tokens"))

    @property
    def window(self) -> tuple[int | None, TokenPolicy]:
        """What a run reads of each prompt: its first ``max_tokens`` tokens, then the kept ones among them."""
        return self.max_tokens, self.tokens

    def reads(self, n_states: int) -> list[int]:
        """Hidden-state indices this run's hooks need (muli reads the final state, index L)."""
        return [n_states - 1] if self.kind == "muli" else list(self.layers)

    def scores_from_logits(self, logits: torch.Tensor) -> np.ndarray:
        """Probe logits (B, C') -> (B,) P(class 1) or (B, C) probabilities, float64, as the trainer scores."""
        return probabilities(logits).to("cpu", torch.float64).numpy()

    def describe(self, score: np.ndarray | float) -> dict:
        """One text's result: label, score (binary: P(label_names[1])) or scores per class, threshold."""
        if self.binary:
            p = float(score)
            threshold = 0.5 if self.threshold is None else float(self.threshold)
            label = self.label_names[1] if p >= threshold else self.label_names[0]  # as compute_metrics decides
            return {"label": label, "score": p, "scores": dict(zip(self.label_names, (1.0 - p, p), strict=True)),
                    "threshold": threshold}
        probs = np.asarray(score, dtype=np.float64)
        return {"label": self.label_names[int(np.argmax(probs))],
                "scores": dict(zip(self.label_names, map(float, probs), strict=True)), "threshold": None}


def load_run(path: str | Path, name: str | None = None, device: str | torch.device = "cpu") -> ServedRun:
    """A run folder written by ``probecache train`` as a :class:`ServedRun` (probe on ``device``, float32)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file() or not (path / "probe.safetensors").is_file():
        raise ServeError(f"{path} is not a complete probecache run (config.json and probe.safetensors): pass the "
                         f"folder printed as `run: ...` by probecache train")
    config = read_json(path / "config.json")
    kind = config.get("probe")
    if kind == "tfidf":
        raise ServeError(f"run {path.name} is a tfidf baseline: it reads the raw text, not the model's hidden "
                         f"states, so it cannot run inside the forward pass; serve a pooling, scoring, mha, linear "
                         f"or muli run (score tfidf with `probecache eval`)")
    if kind not in SERVABLE:
        raise ServeError(f"run {path.name} has probe {kind!r}; serving supports {', '.join(SERVABLE)}")
    store = config["store"]
    try:
        parse_token_policy(config.get("tokens"))
    except TokenPolicyError as e:
        raise ServeError(f"run {path.name}: config.json is damaged ({e}): train the run again") from None
    check_safetensors(path / "probe.safetensors")  # a pickle, a torch.save zip or a torn file: one line, never loaded
    check_store_labels(path.name, store)
    run = ServedRun(name=name or path.name, kind=kind, layers=[int(i) for i in config["layers"]],
                    label_names=list(store["label_names"]), threshold=config.get("threshold"), store=store,
                    path=path, config=config)
    if kind in PROBES:
        probe, probe_config = load_probe(path / "probe.safetensors", device=device)
        if probe_config.n_layers != len(run.layers) or probe_config.hidden_size != store["hidden_size"]:
            raise ServeError(f"run {path.name}: probe.safetensors reads {probe_config.n_layers} layers of width "
                             f"{probe_config.hidden_size} but config.json lists {len(run.layers)} layers of width "
                             f"{store['hidden_size']}: the run folder is inconsistent; retrain it")
        run.probe = probe.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    else:
        run.baseline = LogisticModel.load(path / "probe.safetensors")
        run.readout = config.get("selected", {}).get("readout", "mean")
        if kind == "linear" and len(run.layers) != 1:
            raise ServeError(f"run {path.name}: a linear run reads one layer, config.json lists {run.layers}")
    return run


def check_store_labels(run_name: str, store: dict) -> None:
    """Refuse a run whose store, if still at its recorded local path, disagrees with it on the label names.

    Reads store.json and the manifest parts directly rather than through ``open_store``: whatever else may be wrong
    with the store is for ``store verify`` to report, serving does not need it."""
    location = str(store.get("path") or "")
    folder = Path(location)
    if not location or "://" in location or not (folder / "store.json").is_file():
        return  # moved, deleted or remote: serving does not need the store
    from probecache.manifests.schema import read_parts
    from probecache.train.runner import label_names_problem

    try:
        info = json.loads((folder / "store.json").read_text())
        if info.get("store_id") != store.get("store_id"):
            return  # another store now lives there
        have = info["dataset"]["label_names"]
        manifest = read_parts(folder / "manifests", columns=["label", "label_name"])
    except Exception:  # noqa: BLE001 - a damaged store is not serving's business (store verify reports it)
        return
    problem = label_names_problem(store["label_names"], have, manifest, store.get("store_id"), run_name)
    if problem:
        message, whose = problem
        raise ServeError(message if whose == "store" else f"{message}; the run's config.json no longer matches "
                         f"the data it was trained on: retrain the run")


def load_runs(runs, device: str | torch.device = "cpu") -> list[ServedRun]:
    """Run folders (a list of paths, or a {name: path} dict) or ServedRun objects -> ServedRuns with unique names."""
    if isinstance(runs, (str, Path, ServedRun)):
        runs = [runs]
    items = runs.items() if isinstance(runs, dict) else [(None, r) for r in runs]
    loaded = [r if isinstance(r, ServedRun) else load_run(r, name, device) for name, r in items]
    if not loaded:
        raise ServeError("no runs given: pass at least one run folder")
    names = [r.name for r in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServeError(f"two runs share the name {duplicates[0]!r}: give them distinct names (NAME=RUN on the "
                         f"command line, a {{name: path}} dict in Python)")
    return loaded


def check_runs(runs: list[ServedRun]) -> Tokenisation:
    """Refuse runs that cannot share one forward pass; the common tokenisation otherwise."""
    first = runs[0]
    for run in runs[1:]:
        if run.store.get("model_weights") != first.store.get("model_weights"):
            raise ServeError(f"runs {first.name} and {run.name} come from different models "
                             f"({first.store.get('model_weights')} vs {run.store.get('model_weights')}): one "
                             f"forward pass serves probes of one model; serve them from separate processes")
        for key in TOKENISATION_KEYS:
            if run.store.get(key) != first.store.get(key):
                raise ServeError(f"runs {first.name} and {run.name} were trained on different tokenisations "
                                 f"({key}: {first.store.get(key)!r} vs {run.store.get(key)!r}): they cannot share "
                                 f"a forward pass; re-extract one store with the other's --prompt-format / "
                                 f"--truncation-side and retrain")
    limits = {run.max_tokens for run in runs}
    side = first.store.get("truncation_side") or "right"
    if side == "left" and len(limits) > 1:
        raise ServeError(f"runs truncate prompts on the left to different lengths ({sorted(limits)} tokens): the "
                         f"kept tokens' states depend on the cut, so they cannot share a pass; re-extract with one "
                         f"--max-tokens")
    known = [limit for limit in limits if limit is not None]  # None: no truncation (benchmark runs)
    # max_tokens: with right truncation the longest any run reads (each run masks to its own); left: all equal
    return Tokenisation(first.store.get("prompt_format") or "raw", side, max(known) if known else None)


def check_model_shapes(runs: list[ServedRun], config) -> None:
    """The loaded model must have the width and depth the runs were trained on (and the vocabulary, for muli)."""
    n_states, hidden = config.num_hidden_layers + 1, config.hidden_size
    for run in runs:
        trained = (run.store.get("n_layers"), run.store.get("hidden_size"))
        if trained != (n_states, hidden):
            raise ServeError(f"run {run.name} was trained on a model with {trained[0]} hidden states of width "
                             f"{trained[1]}, this model has {n_states} of width {hidden}: load the model the run "
                             f"was trained with ({run.store.get('model')})")
        if any(not 0 <= i < n_states for i in run.layers):
            raise ServeError(f"run {run.name} reads layers {run.layers}, the model has 0..{n_states - 1}")
        if run.kind == "muli" and run.baseline.n_features != config.vocab_size:
            raise ServeError(f"run {run.name} reads {run.baseline.n_features} logits, the model's vocabulary has "
                             f"{config.vocab_size}: load the model the run was trained with")
        if run.kind == "linear" and run.baseline.n_features != hidden:
            raise ServeError(f"run {run.name} reads {run.baseline.n_features} features, the model has width {hidden}")


def check_source(runs: list[ServedRun], weights_id: str, tokenizer_ids: dict) -> None:
    """The resolved model files must be the very ones the runs' stores were extracted with."""
    run = runs[0]
    if weights_id != run.store.get("model_weights"):
        raise ServeError(f"model {run.store.get('model')!r} now resolves to weights {weights_id}, but run {run.name} "
                         f"was trained on {run.store.get('model_weights')}: pass model= (--model) pointing at the "
                         f"checkpoint the store was extracted with")
    for key in ("tokenizer_sha256", "chat_template_sha256"):
        if tokenizer_ids.get(key) != run.store.get(key):
            what = "tokenizer" if key == "tokenizer_sha256" else "chat template"
            raise ServeError(f"the model's {what} differs from the one run {run.name} was trained with ({key} "
                             f"{tokenizer_ids.get(key)} vs {run.store.get(key)}): serve with the tokenizer files "
                             f"of the extraction, or re-extract and retrain")
