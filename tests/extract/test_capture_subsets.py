"""Capture subsets (issue 12): ``extract --layers`` keeps some layers, ``--tokens`` some tokens of each prompt.

A subset store holds exactly the full store's values at the kept layers and positions (same model, same batches),
its identity says what it holds, and every consumer refuses what it lacks in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from probecache.store.layers import LayerSelectionError
from probecache.store.token_policy import TokenPolicyError, parse_token_policy
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stores(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("subsets")
    make = lambda **kw: extract_tiny_store(tiny_model, root, sentiment_csv, **kw)  # noqa: E731
    return {"full": make(), "layers": make(layers="0,-1"), "last3": make(tokens="last-3"),
            "every2": make(tokens="every-2", layers="1-2"), "last": make(tokens="last"), "root": root,
            "m4": make(tier="mantissa-4"), "m4_last3": make(tier="mantissa-4", tokens="last-3")}


def ids(store) -> list[str]:
    return store.manifest(columns=["example_id"])["example_id"].to_pylist()


# ---- the token policy rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "n", "kept"), [
    ("all", 5, [0, 1, 2, 3, 4]), ("last", 5, [4]), ("last-3", 5, [2, 3, 4]), ("last-9", 3, [0, 1, 2]),
    ("every-2", 5, [0, 2, 4]), ("every-2", 4, [1, 3]), ("every-3", 1, [0]), ("every-1", 3, [0, 1, 2]),
])
def test_token_policy_keeps_the_last_token_and_counts_from_it(spec, n, kept):
    policy = parse_token_policy(spec)
    assert policy.positions(n).tolist() == kept
    assert policy.count(n) == len(kept)


def test_keep_mask_is_the_same_rule_on_left_and_right_padding():
    policy = parse_token_policy("every-2")
    right = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    left = right.flip(1)
    assert torch.nonzero(policy.keep_mask(right)[0]).flatten().tolist() == [0, 2, 4]
    assert torch.nonzero(policy.keep_mask(left)[0]).flatten().tolist() == [2, 4, 6]


@pytest.mark.parametrize("bad", ["first", "last-0", "every-", "last-x", "every-2-3", ""])
def test_a_bad_token_policy_names_the_grammar(bad):
    if bad == "":  # empty is the default (all), like None
        assert parse_token_policy(bad).name == "all"
        return
    with pytest.raises(TokenPolicyError, match="last-N"):
        parse_token_policy(bad)


# ---- what the stores hold ---------------------------------------------------------------------------------


def test_a_layer_subset_holds_the_full_stores_values_of_those_layers(stores):
    full, sub = stores["full"], stores["layers"]
    L = full.n_layers
    assert sub.n_layers == L and sub.stored_layers == [0, L - 1]
    assert sub.store_id != full.store_id
    assert sub.info["identity"]["layers"] == [0, L - 1]
    for eid in ids(full):
        assert torch.equal(sub.hidden(eid), full.hidden(eid, layers=[0, L - 1]))
        assert torch.equal(sub.hidden(eid, layers=-1), full.hidden(eid, layers=-1))
    assert torch.equal(sub.mean(layers="all"), full.mean(layers=[0, L - 1]))
    assert torch.equal(sub.last(layers=[-1, 0]), full.last(layers=[L - 1, 0]))


@pytest.mark.parametrize(("name", "spec", "layers"), [("last3", "last-3", None), ("every2", "every-2", [1, 2]),
                                                      ("last", "last", None)])
def test_a_token_subset_holds_the_full_stores_values_at_the_kept_positions(stores, name, spec, layers):
    full, sub = stores["full"], stores[name]
    policy = parse_token_policy(spec)
    assert sub.token_policy == policy and sub.info["capture"]["tokens"] == spec
    n_full = dict(zip(*(full.manifest(columns=["example_id", "n_tokens"])[c].to_pylist()
                        for c in ("example_id", "n_tokens")), strict=True))
    table = sub.manifest(columns=["example_id", "n_tokens", "truncated"])
    for eid, n, truncated in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        keep = policy.positions(n_full[eid])
        assert n == len(keep) and not truncated
        assert torch.equal(sub.hidden(eid), full.hidden(eid, layers=layers)[:, keep])
    # pooled tiers are over every token the model saw, whatever the policy
    assert torch.equal(sub.mean(), full.mean(layers=layers))
    assert torch.equal(sub.last(), full.last(layers=layers))
    summary = sub.summary()
    assert summary["tokens"] == spec and summary["n_tokens"] == sum(policy.count(n) for n in n_full.values())


def test_a_rounded_token_subset_keeps_the_mean_of_every_rounded_token(stores):
    """mantissa-K rounds all of a prompt's tokens and means them before --tokens drops some: the pooled tier is
    the same as the full rounded store's, and the kept states are its states at those positions."""
    full, sub = stores["m4"], stores["m4_last3"]
    assert torch.equal(sub.mean(), full.mean())
    for eid in ids(full):
        assert torch.equal(sub.hidden(eid), full.hidden(eid)[:, -3:])


@pytest.mark.parametrize("name", ["layers", "last3", "every2", "last", "m4_last3"])
def test_subset_stores_verify_clean(stores, name):
    from probecache.store.verify import verify_store

    report = verify_store(stores[name].path)
    assert report.ok, report.problems


def test_spelling_out_every_layer_or_token_keeps_the_default_store_id(stores, tiny_model, sentiment_csv,
                                                                     extract_tiny_store):
    full = stores["full"]
    same = extract_tiny_store(tiny_model, stores["root"], sentiment_csv, layers=f"0-{full.n_layers - 1}",
                              tokens="every-1")
    assert same.store_id == full.store_id


def test_reading_a_layer_the_store_lacks_is_one_line_naming_what_it_holds(stores):
    sub = stores["layers"]
    with pytest.raises(LayerSelectionError, match=r"holds layers 0,3 only.*layer 1 is not there"):
        sub.hidden(ids(sub)[0], layers=[0, 1])


# ---- extract, train, eval and serve refuse what a store lacks ---------------------------------------------


def test_extract_refuses_bad_subsets_in_one_line(tiny_model, sentiment_csv, tmp_path, one_line_error):
    from probecache.cli import app

    base = ["extract", "--dataset", f"csv:{sentiment_csv}", "--model", str(tiny_model), "--root", str(tmp_path),
            "--no-progress"]
    runner = CliRunner()
    one_line_error(runner.invoke(app, [*base, "--tokens", "first"]), "--tokens", "last-N")
    one_line_error(runner.invoke(app, [*base, "--layers", "0,9"]), "--layers", "out of range")
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_reads_the_layers_the_store_holds_and_refuses_others(stores, tmp_path, one_line_error):
    from probecache.train.runner import TrainOptions, train_run
    from probecache.train.sweep import Grid

    from probecache.cli import app

    sub = stores["layers"]
    run = train_run(sub, TrainOptions(probe="scoring", grid=Grid("scoring", epochs=1), runs_dir=str(tmp_path),
                                      progress=False))
    config = json.loads((run / "config.json").read_text())
    assert config["layers"] == sub.stored_layers and config["tokens"] == "all"
    result = CliRunner().invoke(app, ["train", "--store", str(sub.path), "--probe", "scoring", "--layers", "1",
                                      "--epochs", "1", "--runs-dir", str(tmp_path), "--no-progress"])
    one_line_error(result, "holds layers 0,3 only", "layer 1 is not there")


def test_a_last_token_store_refuses_token_probes_but_trains_pooled_readouts(stores, tmp_path):
    from probecache.train.errors import TrainError
    from probecache.train.runner import TrainOptions, train_run
    from probecache.train.sweep import Grid

    last = stores["last"]
    with pytest.raises(TrainError, match="keeps only each prompt's last token.*--tokens all"):
        train_run(last, TrainOptions(probe="mha", grid=Grid("mha", epochs=1), runs_dir=str(tmp_path), progress=False))
    run = train_run(last, TrainOptions(probe="pooling", grid=Grid("pooling", norms=("none",), epochs=1),
                                       runs_dir=str(tmp_path), progress=False))
    assert json.loads((run / "config.json").read_text())["tokens"] is None  # read the stored means: every token


def test_eval_refuses_a_store_with_other_tokens_than_the_run_read(stores, tmp_path):
    from probecache.train.errors import TrainError
    from probecache.train.runner import TrainOptions, evaluate_run, train_run
    from probecache.train.sweep import Grid

    run = train_run(stores["last3"], TrainOptions(probe="scoring", grid=Grid("scoring", epochs=1),
                                                  runs_dir=str(tmp_path), progress=False))
    assert json.loads((run / "config.json").read_text())["tokens"] == "last-3"
    with pytest.raises(TrainError, match="--tokens last-3"):
        evaluate_run(run, stores["full"], split="test")
