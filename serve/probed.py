"""``ProbedModel``: a causal LM whose own forward pass also scores trained probes (design.md §1, phase 3).

    pm = ProbedModel.from_runs(["runs/<toxicity run>", "runs/<sentiment run>"])
    pm.classify(["some prompt"])                        # [{run name: {label, score, scores, threshold}, ...}]
    pm.generate(["some prompt"], refuse_on="<toxicity run>")  # text + the scores of the generation's prefill

How a pass is probed (``serve/hooks.py`` for where each hidden state comes from):

- Before a call, forward hooks are registered on exactly the modules whose outputs some probe reads; they are
  removed when the call ends, so the wrapped model is untouched in between and can be used on its own.
- Inside each hook, every probe that reads that hidden state runs its stage 1 on it right away
  (``Probe.layer_summary``: (B, T, d) -> (B, d) in float32). Only those (B, d) summaries are kept, never the
  states themselves: the extra memory is B x d x 4 bytes per (probe, layer), not a copy of L+1 layers.
  ``linear`` keeps one pooled vector; ``muli`` applies the LM head to the last prompt position's final state
  (B, d) -> (B, V), as the extractor did.
- After the pass, stage 2 + head (``Probe.head_logits``) turn the summaries into scores. In ``generate`` this
  happens at the first logits-processor call, i.e. between the prefill and the first token (``serve/policy.py``).
- During generation the hooks fire again at every decoding step (T = 1); a pass keeps only the first call per
  hidden state, which is the prefill's. So the scores come from the generation's own prefill, with no second
  forward.

Padding never reaches a probe: a probe's mask is the attention mask (and, for a run whose prompts were truncated
on the right to N tokens, only the first N real tokens: causal attention makes their states identical to those of
the truncated prompt). ``classify`` pads on the right like the extractor, so positions are those of the prompt run
alone; ``generate`` pads on the left, as decoder-only generation needs, and transformers derives position ids
from the attention mask, so real tokens see the same positions and keys as alone. Scores of a text therefore do
not depend on its batch beyond float rounding of differently shaped matmuls (tests: fp32 within 1e-5).

Tokenisation and padding are the extractor's (``probecache.lm.tokens``: ``encode`` with the store's Tokenisation,
``pad_batch``): raw text with the tokenizer's special tokens, or the chat template with the generation prompt.

Prompts longer than a probe reads (its store's ``max_tokens``) are refused by default (``PromptTooLong``): a
guardrail that scores only the first 512 tokens of a prompt is bypassed by putting 512 harmless tokens first.
``truncate=True`` opts in to scoring the part the probe was trained to read, cut on the store's truncation side as
the extractor cut: ``classify`` cuts the prompt; ``generate`` with right truncation feeds the whole prompt to the
model and lets each probe read its first ``max_tokens`` tokens; with left truncation the prompt is cut as in
training (the kept states depend on the cut). Every probe result says ``truncated``.

Concurrency: one pass at a time per ProbedModel (a lock): the hooks read the pass state of the running call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from probecache.lm.errors import ModelError
from probecache.lm.models import (
    ModelSource,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
    tokenizer_identity,
)
from probecache.lm.tokens import Tokenisation, encode, pad_batch, pad_token_id, truncate
from probecache.store.codecs import LOGICAL_DTYPES

from .errors import PromptTooLong, ServeError
from .hooks import register_state_hooks, remove_hooks
from .loading import ServedRun, check_model_shapes, check_runs, check_source, load_runs
from .policy import DEFAULT_REFUSAL, RefuseFirstToken, parse_rules, refused_by

DEFAULT_BATCH_SIZE = 16


@dataclass
class ProbedOutput:
    """The model's usual outputs and, per run name, the probe scores of the same pass: (B,) P(class 1) for a
    binary run, (B, C) class probabilities otherwise (float64 numpy, as ``scores.parquet``)."""

    outputs: object
    scores: dict[str, np.ndarray]


class _Pass:
    """What one probed forward pass keeps: the masks it reads through, and per run its stage-1 summaries."""

    def __init__(self, attention_mask: torch.Tensor, runs: list[ServedRun]):
        valid = attention_mask.to(torch.bool)  # (B, T)
        self.shape = tuple(valid.shape)
        positions = torch.arange(valid.shape[1], device=valid.device)  # (T,)
        self.masks: dict[tuple, torch.Tensor] = {}  # a run's window (max_tokens, token policy) -> its (B, T) mask
        self.last: dict[tuple, torch.Tensor] = {}  # -> (B,) index of the last position it reads
        for window in {run.window for run in runs}:
            limit, policy = window
            mask = valid if limit is None else valid & (valid.long().cumsum(dim=1) <= limit)  # first `limit` tokens
            self.last[window] = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)  # (B,); left or right pad
            self.masks[window] = policy.keep_mask(mask)  # the tokens its store kept (--tokens; the last always)
        self.seen: set[int] = set()
        self.summaries = [[None] * len(run.layers) if run.probe is not None else None for run in runs]
        self.features: list[torch.Tensor | None] = [None] * len(runs)  # linear (B, d) / muli (B, V)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in LOGICAL_DTYPES:  # a store's logical dtype name: "bfloat16", "float16", "float32"
        return LOGICAL_DTYPES[dtype][0]
    try:
        return resolve_dtype(dtype, "cpu")  # "bf16" | "fp16" | "fp32" ("auto" needs a device: resolved below)
    except ModelError as e:
        raise ServeError(str(e)) from None


class ProbedModel:
    """A loaded causal LM plus one or more served runs that score every pass (see the module docstring)."""

    def __init__(self, model, tokenizer, runs, *, source: ModelSource | None = None):
        """``model``: a loaded Llama-family causal LM (eval mode); ``tokenizer``: its tokenizer (None: token-id
        methods only); ``runs``: run folders (list or {name: path}) or ServedRun objects. ``source``: where the
        model came from; when given, its weights and tokenizer hashes must be the runs' (``from_runs`` passes it).
        Without it the caller vouches for the model's identity; its shapes are checked either way."""
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.runs = load_runs(runs, device=self.device)
        self.tokenisation: Tokenisation = check_runs(self.runs)
        check_model_shapes(self.runs, model.config)
        if source is not None:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed to check the model source's tokenizer identity")
            check_source(self.runs, source.weights_id, tokenizer_identity(source, tokenizer))
        if (self.tokenisation.prompt_format == "chat" and tokenizer is not None
                and not getattr(tokenizer, "chat_template", None)):
            raise ServeError(f"run {self.runs[0].name} was trained on chat-formatted prompts (--prompt-format chat) "
                             f"but this tokenizer has no chat template: load the tokenizer of the extraction")
        for run in self.runs:
            if run.probe is not None:
                run.probe.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.n_states = model.config.num_hidden_layers + 1
        self._consumers: dict[int, list[tuple[int, int]]] = {}  # hidden index -> [(run index, block index)]
        for k, run in enumerate(self.runs):
            for j, index in enumerate(run.reads(self.n_states)):
                self._consumers.setdefault(index, []).append((k, j))
        self._lock = threading.Lock()
        self._pass: _Pass | None = None

    @classmethod
    def from_runs(cls, run_dirs, device: str = "cpu", dtype=None, model: str | None = None) -> ProbedModel:
        """Load the runs and the model their stores were extracted with (``model`` overrides where it is found,
        e.g. a moved folder; its weights must still match). ``dtype`` defaults to the store's."""
        runs = load_runs(run_dirs)
        check_runs(runs)  # before loading any model: a mixed set fails fast
        store = runs[0].store
        try:
            source = resolve_model(model or store["model"])
            device = resolve_device(device)
            torch_dtype = resolve_dtype("auto", device) if dtype == "auto" else _torch_dtype(dtype or store["dtype"])
        except ModelError as e:
            raise ServeError(str(e)) from None
        if source.weights_id != store.get("model_weights"):  # checked again in __init__; fail before the load
            check_source(runs, source.weights_id, {})
        loaded, tokenizer = load_model(source, torch_dtype, device)
        return cls(loaded, tokenizer, runs, source=source)

    @property
    def names(self) -> list[str]:
        return [run.name for run in self.runs]

    @property
    def read_limit(self) -> int | None:
        """The fewest tokens some served probe reads (the smallest store ``max_tokens``; None: no limit). A longer
        prompt is refused unless ``truncate=True``."""
        known = [run.max_tokens for run in self.runs if run.max_tokens is not None]
        return min(known) if known else None

    @property
    def pad_id(self) -> int:
        # any id works (masked everywhere); the extractor's choice, falling back on the model config without a tokenizer
        return pad_token_id(self.tokenizer, self.model.config)

    def _eos_ids(self) -> list[int]:
        value = getattr(self.model.generation_config, "eos_token_id", None)
        if value is None and self.tokenizer is not None:
            value = self.tokenizer.eos_token_id
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

    # ---- tokenisation -----------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], whole: bool = False) -> tuple[list[list[int]], list[int]]:
        """Token ids per text exactly as the extractor made them, and the untruncated lengths. ``whole``: no
        right truncation (generation feeds the whole prompt; each probe still reads its first max_tokens)."""
        if self.tokenizer is None:
            raise ValueError("this ProbedModel has no tokenizer: pass token ids")
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if not texts:
            return [], []
        ids, lengths = encode(list(texts), self.tokenizer, self._cut_by(whole))
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise ServeError(f"text {empty[0]} has no tokens: pass non-empty texts")
        return ids, lengths

    def _check_lengths(self, lengths: Sequence[int], truncate: bool) -> None:
        """Refuse a prompt of more tokens than some probe reads, unless the caller opted in to ``truncate``."""
        if truncate or self.read_limit is None:
            return
        run = min((r for r in self.runs if r.max_tokens is not None), key=lambda r: r.max_tokens)
        part = "first" if self.tokenisation.truncation_side == "right" else "last"
        for i, n in enumerate(lengths):
            if n > run.max_tokens:
                raise PromptTooLong(
                    f"text {i} has {n} tokens but probe {run.name} reads at most {run.max_tokens} (its store's "
                    f"--max-tokens), so it would score only the {part} {run.max_tokens}: shorten the text, "
                    f"re-extract with a larger --max-tokens and retrain, or opt in to scoring the {part} "
                    f"{run.max_tokens} tokens (truncate=True; --truncate)", i, n, run.max_tokens)

    def _cut_by(self, whole: bool) -> Tokenisation:
        """The runs' tokenisation (store side, the longest max_tokens any run reads); ``whole``: right truncation
        keeps the whole prompt (generation: the model answers all of it, each probe masks its own window)."""
        t = self.tokenisation
        return replace(t, max_tokens=None) if whole and t.truncation_side == "right" else t

    def _cut(self, token_ids: Sequence[Sequence[int]], whole: bool) -> list[Sequence[int]]:
        """Token ids cut as the extractor cuts them (see ``_cut_by``)."""
        return truncate(token_ids, self._cut_by(whole))

    # ---- one probed pass ------------------------------------------------------------------------------

    @contextmanager
    def _probing(self, attention_mask: torch.Tensor):
        """Hooks on for one call: the first forward inside is the probed pass."""
        with self._lock:
            self._pass = _Pass(attention_mask, self.runs)
            handles = register_state_hooks(self.model, self._observe, self._consumers)
            try:
                yield self._pass
            finally:
                remove_hooks(handles)
                self._pass = None

    def _observe(self, index: int, hidden: torch.Tensor) -> None:
        """The hook callback: stage 1 of every run that reads hidden-state ``index``; hidden (B, T, d)."""
        p = self._pass
        if p is None or index in p.seen:  # decoding steps after the prefill
            return
        p.seen.add(index)
        if tuple(hidden.shape[:2]) != p.shape:
            raise RuntimeError(f"the probed pass saw hidden states of shape {tuple(hidden.shape)} for an attention "
                               f"mask of shape {p.shape}: was the prompt split (chunked prefill, cached prefix)?")
        for k, j in self._consumers[index]:
            run = self.runs[k]
            mask, last = p.masks[run.window], p.last[run.window]
            if run.probe is not None:
                p.summaries[k][j] = run.probe.layer_summary(j, hidden, mask)  # (B, d) float32
            elif run.kind == "linear" and run.readout == "mean":
                # as the extractor's pooled tier: float32 sum of the stored-dtype values over real tokens;
                # masked_fill rather than * mask so that garbage at left-padded positions cannot leak (0 * inf)
                total = hidden.masked_fill(~mask[..., None], 0).sum(dim=1, dtype=torch.float32)  # (B, d)
                p.features[k] = total / mask.sum(dim=1, keepdim=True).clamp(min=1)
            else:
                state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d), model dtype
                # linear/last: the state itself; muli: next-token logits at the last prompt position (B, V)
                p.features[k] = state if run.kind == "linear" else self.model.get_output_embeddings()(state)

    def _finish(self, p: _Pass) -> dict[str, np.ndarray]:
        """Stage 2 + head (probes) or the logistic model (baselines): run name -> (B,) or (B, C) scores."""
        out = {}
        for k, run in enumerate(self.runs):
            if run.probe is not None:
                missing = [run.layers[j] for j, s in enumerate(p.summaries[k]) if s is None]
                if missing:
                    raise RuntimeError(f"the forward pass never produced hidden states {missing} for run {run.name}")
                logits = run.probe.head_logits(torch.stack(p.summaries[k], dim=1))  # (B, L1, d) -> (B, C')
                out[run.name] = run.scores_from_logits(logits)
            else:
                if p.features[k] is None:
                    raise RuntimeError(f"the forward pass never reached the state run {run.name} reads")
                out[run.name] = run.baseline.predict_proba(p.features[k])  # numpy float64
        return out

    def _results(self, scores: dict[str, np.ndarray], lengths: Sequence[int]) -> list[dict]:
        """Per prompt, per run: its result, and whether that run read only part of the prompt (``lengths``: the
        prompts' untruncated token counts)."""
        return [{run.name: run.describe(scores[run.name][b])
                 | {"truncated": run.max_tokens is not None and n > run.max_tokens} for run in self.runs}
                for b, n in enumerate(lengths)]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **model_kwargs) -> ProbedOutput:
        """The wrapped model's forward (its usual outputs: logits, cache, ...) plus the probe scores of that pass.

        ``input_ids`` (B, T) must be tokenised as the runs' stores were (``encode``); padding on either side is
        fine as long as ``attention_mask`` marks it (with left padding pass ``position_ids`` as generate does)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        with self._probing(attention_mask) as p:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
            scores = self._finish(p)
        return ProbedOutput(outputs, scores)

    __call__ = forward

    # ---- classification -------------------------------------------------------------------------------

    def classify(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, truncate: bool = False
                 ) -> list[dict]:
        """Per text, per run name: ``{"label", "score" (binary: P(label_names[1])), "scores", "threshold",
        "truncated"}``. A text longer than a probe reads raises ``PromptTooLong`` unless ``truncate``: then each
        probe scores the part it was trained to read (``truncated: true``)."""
        ids, lengths = self.encode(texts)
        self._check_lengths(lengths, truncate)
        return self._results(self.score_ids(ids, batch_size, truncate=True), lengths)

    @torch.inference_mode()
    def score_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = DEFAULT_BATCH_SIZE,
                  truncate: bool = False) -> dict[str, np.ndarray]:
        """Probe scores of tokenised prompts, in input order: run name -> (N,) or (N, C).

        A prompt longer than a probe reads raises ``PromptTooLong`` unless ``truncate`` (then cut as the extractor
        cut). Batches of similar length (longest first), right-padded as in extraction; the base model runs
        without its LM head (only muli needs logits, and only at one position per prompt)."""
        if batch_size < 1:
            raise ServeError(f"batch_size (--batch-size) must be at least 1, got {batch_size}")
        self._check_lengths([len(ids) for ids in token_ids], truncate)
        token_ids = self._cut(token_ids, whole=False)
        if not token_ids:
            return {run.name: np.zeros((0,) if run.binary else (0, len(run.label_names))) for run in self.runs}
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        parts: dict[str, list[np.ndarray]] = {run.name: [] for run in self.runs}
        base = self.model.base_model
        for start in range(0, len(order), batch_size):
            batch = [token_ids[i] for i in order[start:start + batch_size]]
            ids, mask = pad_batch(batch, self.pad_id, self.device, side="right")  # (B, T)
            with self._probing(mask) as p:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
                for name, s in self._finish(p).items():
                    parts[name].append(s)
        inverse = np.argsort(np.asarray(order))
        return {name: np.concatenate(chunks)[inverse] for name, chunks in parts.items()}

    # ---- generation -----------------------------------------------------------------------------------

    def generate(self, texts: Sequence[str], max_new_tokens: int = 32, refuse_on=None,
                 refusal: str = DEFAULT_REFUSAL, truncate: bool = False, **generate_kwargs) -> list[dict]:
        """Generate a continuation of each prompt (one batch, left-padded) and score the probes on its prefill.

        ``refuse_on``: probes that guard generation (``serve/policy.py``: a name, names, or {name: None | threshold
        | label(s)}); a flagged prompt gets ``refusal`` instead of generated text, decided before its first token.
        Other keyword arguments go to the model's ``generate`` (greedy by default). A prompt longer than a probe
        reads raises ``PromptTooLong`` before the model runs, unless ``truncate``.

        Returns per text ``{"text", "refused", "refused_by", "probes": {run name: result}, "prompt_tokens",
        "new_tokens", "truncated"}``; ``truncated`` (possible only with ``truncate``): some probe read only the
        first max_tokens of a longer prompt (or, with left truncation, the prompt itself was cut as in training)."""
        ids, lengths = self.encode(texts, whole=True)
        self._check_lengths(lengths, truncate)
        return self._generate(ids, lengths, max_new_tokens, refuse_on, refusal, True, generate_kwargs)

    def generate_ids(self, token_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, refuse_on=None,
                     refusal: str = DEFAULT_REFUSAL, decode: bool = True, truncate: bool = False,
                     **generate_kwargs) -> list[dict]:
        """``generate`` on tokenised prompts; ``decode=False`` leaves ``"text"`` out and returns ``"token_ids"``."""
        lengths = [len(ids) for ids in token_ids]
        self._check_lengths(lengths, truncate)
        return self._generate(self._cut(token_ids, whole=True), lengths, max_new_tokens, refuse_on, refusal, decode,
                              generate_kwargs)

    def _generate(self, token_ids: Sequence[Sequence[int]], lengths: Sequence[int], max_new_tokens: int, refuse_on,
                  refusal: str, decode: bool, generate_kwargs: dict) -> list[dict]:
        """Generation on prompts already checked and cut; ``lengths``: their untruncated token counts."""
        if max_new_tokens < 1:
            raise ServeError(f"max_new_tokens must be at least 1 (the probes score the prefill of the first token), "
                             f"got {max_new_tokens}")
        for key in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(key, 1) != 1:
                raise ValueError(f"{key} > 1 multiplies the rows of the prefill; probed generation supports one "
                                 f"sequence per prompt")
        if not token_ids:
            return []
        rules = parse_rules(refuse_on, self.runs)
        eos = self._eos_ids()
        ids, mask = pad_batch(token_ids, self.pad_id, self.device, side="left")  # (B, T)
        decided: dict = {}

        def decide() -> torch.Tensor:  # at the first logits-processor call: the prefill is complete
            scores = self._finish(p)
            results = self._results(scores, lengths)
            decided["results"] = results
            decided["refused_by"] = [refused_by(rules, r) for r in results]
            return torch.tensor([bool(r) for r in decided["refused_by"]], dtype=torch.bool)

        from transformers import LogitsProcessorList

        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(RefuseFirstToken(decide, eos[0] if eos else None))
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.pad_id)
        if eos:
            generate_kwargs.setdefault("eos_token_id", eos)
        with self._probing(mask) as p:
            sequences = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            logits_processor=processors, **generate_kwargs)
        if not decided:
            raise RuntimeError("generate never called its logits processors: the probes were not scored")
        new = sequences[:, ids.shape[1]:].tolist()  # (B, <= max_new_tokens)
        stop = set(eos)
        out = []
        for b, (tokens, results, flagged) in enumerate(zip(new, decided["results"], decided["refused_by"],
                                                          strict=True)):
            kept = []
            for t in tokens:
                if t in stop:
                    break
                kept.append(t)
            if flagged:
                kept = []
            row = {"refused": bool(flagged), "refused_by": flagged, "probes": results,
                   "prompt_tokens": len(token_ids[b]), "new_tokens": len(kept),
                   "truncated": any(r["truncated"] for r in results.values())}
            if decode:
                row["text"] = refusal if flagged else self.tokenizer.decode(kept, skip_special_tokens=True)
            else:
                row["token_ids"] = kept
            out.append(row)
        return out


def run_names(specs: Sequence[str]) -> dict[str, Path] | list[Path]:
    """Command-line run arguments ``RUN`` or ``NAME=RUN`` -> what ``from_runs`` takes."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and not Path(spec).exists():
            named[name] = Path(path)
        else:
            named[Path(spec).name or spec] = Path(spec)
    if len(named) != len(specs):
        raise ServeError(f"two --run arguments share a name ({', '.join(specs)}): name them NAME=RUN")
    return named
