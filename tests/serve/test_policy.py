"""The refusal policy (serve/policy.py): a flagged prompt gets the refusal before its first token, an unflagged one
generates exactly as without the policy, in a batch or alone, greedy or sampled; rules are checked up front.

Probes that always / never fire are crafted from a trained pooling run: head weights 0 and a bias of +-30 make
P(positive) ~1 / ~0 whatever the prompt.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from probecache.serve.errors import ServeError
from probecache.serve.loading import ServedRun, load_run
from probecache.serve.policy import DEFAULT_REFUSAL, RefusalRule, merge, parse_rules
from probecache.serve.probed import ProbedModel
from probecache.train.probes import ProbeConfig, build_probe

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the film was great great", "acting: awful awful", "so very lovely lovely", "overall poor poor"]


def constant(run: ServedRun, name: str, bias: float) -> ServedRun:
    """A copy of ``run`` whose probe ignores its input: P(positive) = sigmoid(bias)."""
    probe = build_probe(run.probe.config)
    probe.load_state_dict(run.probe.state_dict())
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.fill_(bias)
    return dataclasses.replace(run, name=name, probe=probe.eval().requires_grad_(False))


@pytest.fixture(scope="module")
def probed(runs32, probed32):
    pooling = load_run(runs32("pooling"), "pooling")
    return ProbedModel(probed32.model, probed32.tokenizer,
                       [pooling, constant(pooling, "always", 30.0), constant(pooling, "never", -30.0)])


def count_passes(model):
    """Records the sequence length of every forward of the base model; returns (lengths, handle)."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        lengths.append((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])

    return lengths, model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("n", [1, 3])
def test_a_firing_probe_refuses_before_the_first_token(probed, n):
    lengths, handle = count_passes(probed.model)
    try:
        out = probed.generate(TEXTS[:n], max_new_tokens=8, refuse_on="always", refusal="No.")
    finally:
        handle.remove()
    assert len(lengths) == 1  # the prefill only: every row is finished at step one, no decoding step runs
    for row in out:
        assert row["refused"] and row["refused_by"] == ["always"] and row["text"] == "No." and row["new_tokens"] == 0
        assert row["probes"]["always"]["score"] > 0.99 and row["probes"]["always"]["label"] == "pos"


def test_a_silent_probe_changes_nothing(probed):
    plain = probed.generate(TEXTS, max_new_tokens=6, min_new_tokens=6)
    guarded = probed.generate(TEXTS, max_new_tokens=6, min_new_tokens=6, refuse_on={"never": None})
    assert [g["text"] for g in guarded] == [p["text"] for p in plain]
    assert not any(g["refused"] for g in guarded) and all(g["new_tokens"] == 6 for g in guarded)


def test_mixed_batch_refuses_only_the_flagged_rows(probed):
    scores = [r["pooling"]["score"] for r in probed.classify(TEXTS)]
    low, high = sorted(scores)[1:3]
    assert high - low > 1e-4
    threshold = (low + high) / 2  # the two highest-scoring prompts fire (halfway: immune to float noise)
    plain = probed.generate(TEXTS, max_new_tokens=5, min_new_tokens=5)
    out = probed.generate(TEXTS, max_new_tokens=5, min_new_tokens=5, refuse_on={"pooling": threshold})
    for score, p, o in zip(scores, plain, out, strict=True):
        if score >= threshold:
            assert o["refused"] and o["text"] == DEFAULT_REFUSAL and o["refused_by"] == ["pooling"]
        else:
            assert not o["refused"] and o["text"] == p["text"] and o["new_tokens"] == 5
    assert sum(o["refused"] for o in out) == 2


def test_refusal_holds_under_sampling(probed):
    out = probed.generate(TEXTS[:2], max_new_tokens=4, refuse_on=["always"], do_sample=True, temperature=1.5,
                          top_k=5)
    assert all(o["refused"] and o["new_tokens"] == 0 for o in out)


def test_default_rule_uses_the_runs_tuned_threshold(probed):
    (rule,) = parse_rules("pooling", probed.runs)
    assert rule == RefusalRule("pooling", labels=frozenset(["pos"]))
    for result in probed.classify(TEXTS):
        r = result["pooling"]
        assert rule.fires(r) == (r["score"] >= r["threshold"])


def multiclass(run: ServedRun) -> ServedRun:
    """A 3-class probe of the same shapes whose head always prefers class "c"."""
    cfg = run.probe.config
    probe = build_probe(ProbeConfig("pooling", cfg.n_layers, cfg.hidden_size, 3, norm=cfg.norm))
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.copy_(torch.tensor([0.0, 1.0, 9.0]))
    return dataclasses.replace(run, name="emotion", probe=probe.eval(), label_names=["a", "b", "c"], threshold=None)


def test_multiclass_results_and_label_rules(probed):
    pm = ProbedModel(probed.model, probed.tokenizer, [multiclass(probed.runs[0])])
    (result,) = pm.classify(TEXTS[:1])
    r = result["emotion"]
    assert r["label"] == "c" and r["threshold"] is None and "score" not in r
    assert sum(r["scores"].values()) == pytest.approx(1.0) and r["scores"]["c"] > 0.99
    assert pm.generate(TEXTS[:1], max_new_tokens=3, refuse_on={"emotion": ["b", "c"]})[0]["refused"]
    assert not pm.generate(TEXTS[:1], max_new_tokens=3, refuse_on={"emotion": "a"})[0]["refused"]
    with pytest.raises(ServeError, match="say which labels refuse"):
        pm.generate(TEXTS[:1], refuse_on="emotion")
    with pytest.raises(ServeError, match="multiclass"):
        pm.generate(TEXTS[:1], refuse_on={"emotion": 0.5})


@pytest.mark.parametrize("refuse_on, message", [
    ({"nope": None}, "not served"),
    ({"pooling": 1.5}, r"probability in \[0, 1\]"),
    ({"pooling": "toxic"}, "has labels"),
])
def test_bad_rules_are_refused_up_front(probed, refuse_on, message):
    with pytest.raises(ServeError, match=message):
        probed.generate(TEXTS[:1], refuse_on=refuse_on)


@pytest.mark.parametrize("kwargs, message, error", [
    ({"max_new_tokens": 0}, "at least 1", ServeError),  # --max-new-tokens, a request's max_new_tokens
    ({"num_beams": 2}, "one sequence per prompt", ValueError),  # Python callers' generate kwargs only
    ({"num_return_sequences": 2}, "one sequence per prompt", ValueError),
])
def test_unsupported_generation_options(probed, kwargs, message, error):
    with pytest.raises(error, match=message):
        probed.generate(TEXTS[:1], **kwargs)


def test_merged_policies_keep_the_base_rules():
    """A server's rules survive a request's: added probes join, a looser rule for a guarded probe is ignored."""
    assert merge({"tox": None}, {"tox": 0.99, "spam": "yes"}) == {"tox": None, "spam": "yes"}
    assert merge(["tox"], None) == {"tox": None} and merge(None, "spam") == {"spam": None}
