"""The refusal policy: stop before the first generated token when a safety probe fires.

``refuse_on`` names the probes that guard generation and when each fires:

    {"toxicity": None}          binary: the run's positive class (label_names[1]) at its tuned threshold
    {"toxicity": 0.3}           binary: P(label_names[1]) >= 0.3 (a stricter or looser threshold)
    {"emotion": "anger"}        any run: its predicted label is "anger"
    {"emotion": ["anger", "fear"]}
    "toxicity" / ["toxicity", "spam"]   shorthand for {name: None, ...}

How the stop is carried out: :class:`RefuseFirstToken`, a ``LogitsProcessor`` handed to the model's own
``generate``. Transformers calls it with the prefill's next-token scores, after the prefill forward and before the
first token is chosen. At that call it finishes the probes (stage 2 + head on the summaries the hooks kept during
that same prefill), applies the rules, and for each flagged row masks every token but EOS. The flagged row's only
"generated" token is then EOS: it is finished, nothing of it is decoded or streamed, and the caller returns the
configured refusal text instead. With one prompt, or when every row is flagged, generation ends right there: no
decoding step runs at all.

Why a logits processor rather than a manual prefill followed by ``generate(past_key_values=...)``: one ordinary
``generate`` call keeps every decoding feature (sampling, stopping criteria, cache classes, streamers) as the
installed transformers implements it, and the only thing we rely on is the documented processor call order,
whereas resuming from our own prefill re-implements cache and position-id plumbing that has changed across
transformers releases (5.x renamed ``past_key_values`` to ``cache``). The cost: in a batch, a refused row rides
along as a finished row (its positions are padding) until the others stop, exactly like any row that hits EOS
early; dropping it from the batch would save that compute at the price of the plumbing above.

Custom processors run before the sampling warpers (temperature, top-k/p), which keep a single finite score, so
EOS is chosen with probability 1 under greedy decoding and sampling alike. Beam search and several return
sequences per prompt multiply the batch rows and are refused by ``ProbedModel.generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from .errors import ServeError
from .loading import ServedRun

DEFAULT_REFUSAL = "I can't help with that request."


@dataclass(frozen=True)
class RefusalRule:
    """Refuse when probe ``probe`` predicts one of ``labels``, or (binary) its score reaches ``threshold``."""

    probe: str
    labels: frozenset[str] | None = None
    threshold: float | None = None

    def fires(self, result: dict) -> bool:
        """``result``: one text's entry for this probe (``ServedRun.describe``)."""
        if self.threshold is not None:
            return result["score"] >= self.threshold
        return result["label"] in self.labels


_SPELLINGS = "a probe name, a list of names, or {name: null | threshold | label | [labels]}"


def as_mapping(refuse_on) -> dict:
    """Any accepted spelling of ``refuse_on`` -> {probe name: None | threshold | label(s)}; ServeError for anything
    else (it may come from an HTTP request body, so its shape is checked here, not trusted)."""
    if refuse_on is None:
        return {}
    if isinstance(refuse_on, str):
        return {refuse_on: None}
    if isinstance(refuse_on, Mapping):
        rules = dict(refuse_on)
    elif isinstance(refuse_on, (list, tuple)) and all(isinstance(name, str) for name in refuse_on):
        rules = dict.fromkeys(refuse_on)
    else:
        raise ServeError(f"refuse_on must be {_SPELLINGS}, got {refuse_on!r}")
    if not all(isinstance(name, str) for name in rules):
        raise ServeError(f"refuse_on names probes by their names (strings), got {sorted(map(repr, rules))}")
    return rules


def merge(base, extra) -> dict:
    """``extra``'s rules added to ``base``'s, ``base`` winning for a probe both name: a client request can add
    refusals to a server's policy but never lift or loosen one."""
    return {**as_mapping(extra), **as_mapping(base)}


def parse_rules(refuse_on, runs: list[ServedRun]) -> list[RefusalRule]:
    """``refuse_on`` (see the module docstring) -> rules, checked against the served runs' names and labels."""
    refuse_on = as_mapping(refuse_on)
    by_name = {run.name: run for run in runs}
    rules = []
    for name, when in refuse_on.items():
        run = by_name.get(name)
        if run is None:
            raise ServeError(f"refuse_on names probe {name!r}, which is not served (served: {', '.join(by_name)})")
        if when is None or when is True:
            if not run.binary:
                raise ServeError(f"probe {name} has {len(run.label_names)} classes: say which labels refuse, e.g. "
                                 f"refuse_on={{{name!r}: {run.label_names[-1]!r}}}")
            rules.append(RefusalRule(name, labels=frozenset([run.label_names[1]])))
        elif isinstance(when, (int, float)) and not isinstance(when, bool):
            if not run.binary:
                raise ServeError(f"probe {name} is multiclass: a threshold applies to binary probes; name the "
                                 f"labels that refuse instead (one of {run.label_names})")
            if not 0.0 <= float(when) <= 1.0:
                raise ServeError(f"refusal threshold for {name} must be a probability in [0, 1], got {when}")
            rules.append(RefusalRule(name, threshold=float(when)))
        else:
            if not (isinstance(when, str) or isinstance(when, (list, tuple)) and all(isinstance(v, str) for v in when)):
                raise ServeError(f"refuse_on[{name!r}] must be null, a threshold, a label or a list of labels, got "
                                 f"{when!r}")
            labels = frozenset([when] if isinstance(when, str) else when)
            unknown = sorted(labels - set(run.label_names))
            if unknown or not labels:
                raise ServeError(f"probe {name} has labels {run.label_names}; refuse_on gave {sorted(labels)}")
            rules.append(RefusalRule(name, labels=labels))
    return rules


def refused_by(rules: Iterable[RefusalRule], results: dict) -> list[str]:
    """Names of the probes whose rule fires for one text (``results``: probe name -> its entry)."""
    return [rule.probe for rule in rules if rule.fires(results[rule.probe])]


class RefuseFirstToken(LogitsProcessor):
    """At the first generation step, call ``decide()`` once -> (B,) bool; flagged rows can only emit ``eos_id``.

    Later steps pass scores through untouched: a refused row is finished after its EOS, and generate pads it.
    """

    def __init__(self, decide: Callable[[], torch.Tensor], eos_id: int | None):
        self.decide, self.eos_id = decide, eos_id
        self.flagged: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.flagged is not None:
            return scores
        self.flagged = self.decide().to(scores.device)  # (B,) bool
        if self.flagged.any():
            if self.eos_id is None:
                raise ServeError("a refusal needs an end-of-sequence token: this model's generation config and "
                                 "tokenizer define none")
            forced = torch.full_like(scores[0], float("-inf"))  # (V,)
            forced[self.eos_id] = 0.0
            scores = torch.where(self.flagged[:, None], forced, scores)  # (B, V)
        return scores
