"""Shared fixtures: a tiny random-init Llama with a byte-level tokenizer, built locally (no downloads)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def build_tiny_llama(folder: Path, seed: int = 0, layers: int = 3) -> Path:
    """A 3-block Llama (d = 64) and a byte-level BPE tokenizer with no merges (one token per byte)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is tiny; scale up so states differ visibly between layers
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_other_weights(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-2"), seed=1)


TEXTS = [
    "great film", "terrible acting and a plot with more holes than a sieve", "ok",
    "I loved every minute of it, from the opening shot to the credits", "meh",
    "not worth the ticket", "a quiet masterpiece", "boring boring boring boring boring",
    "the best thing I have seen this year", "dull", "surprisingly moving", "awful dialogue",
    "charming and funny", "a mess from start to finish, with no redeeming features at all", "fine",
    "wonderful", "two hours I will never get back", "smart, sharp and beautifully shot", "bad", "good",
    "an instant classic", "forgettable", "the cast is excellent", "poorly edited", "heartfelt",
    "a chore to sit through", "delightful", "clumsy", "superb", "lifeless",
]


def write_reviews_csv(path: Path, positive_every: int = 2) -> Path:
    """30 labelled rows of varied length with a split column (train 20, validation 5, test 5)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for i, text in enumerate(TEXTS):
            split = "train" if i < 20 else "validation" if i < 25 else "test"
            w.writerow([f"r{i:02d}", text, "pos" if i % positive_every == 0 else "neg", split])
    return path


@pytest.fixture(scope="session")
def reviews_csv_writer():
    """``write_reviews_csv`` for module-scoped fixtures (function-scoped ``tiny_csv`` cannot serve them)."""
    return write_reviews_csv


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_reviews_csv(tmp_path / "reviews.csv")


@pytest.fixture
def extract_config(tiny_model, tiny_csv, tmp_path):
    """An ExtractConfig factory on the tiny model; small shards and batches to exercise the batching."""
    from probecache.extract.config import ExtractConfig

    def make(**overrides) -> ExtractConfig:
        base = dict(dataset=f"csv:{tiny_csv}", model=str(tiny_model), root=str(tmp_path / "stores"),
                    dtype="fp32", device="cpu", shard_size=8, batch_tokens=96, progress=False)
        return ExtractConfig(**{**base, **overrides})

    return make


# ---- train-stage fixtures: a learnable labelled set and tiny stores extracted from it ----------------------

SENTIMENT_POSITIVE = ["great", "superb", "lovely", "wonderful"]
SENTIMENT_NEGATIVE = ["awful", "dreadful", "poor", "terrible"]
SENTIMENT_PREFIXES = ["the film was", "acting:", "the plot is", "really", "so very", "overall"]


def write_sentiment_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    """``n`` rows, alternating pos / neg, the label carried by one repeated word; train / validation / test 4:1:1."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            word = rng.choice(SENTIMENT_POSITIVE if label == "pos" else SENTIMENT_NEGATIVE)
            split = "train" if i < n * 4 // 6 else "validation" if i < n * 5 // 6 else "test"
            w.writerow([f"e{i:02d}", f"{rng.choice(SENTIMENT_PREFIXES)} {word} {word}", label, split])
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """60 reviews whose label one word carries (train 40 / validation 10 / test 10): probes must beat chance."""
    return write_sentiment_csv(tmp_path_factory.mktemp("sentiment") / "reviews.csv")


@pytest.fixture(scope="session")
def extract_tiny_store():
    """``extract(model, root, data_csv, **ExtractConfig overrides) -> Store``: bf16, shards of 8, no progress."""

    def extract_store(model: Path, root: Path, data: Path, **overrides):
        from probecache.extract.config import ExtractConfig
        from probecache.extract.run import extract
        from probecache.store.reader import open_store

        base = dict(dataset=f"csv:{data}", model=str(model), root=str(root), dtype="bf16", device="cpu",
                    shard_size=8, batch_tokens=256, progress=False)
        return open_store(extract(ExtractConfig(**{**base, **overrides})).store_path)

    return extract_store


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two and never spins against a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(result, *fragments)``: a CLI user error is exit code 2 and one `error:` line naming them."""

    def check(result, *fragments: str) -> str:
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        for fragment in fragments:
            assert fragment in err, err
        assert "Traceback" not in result.output
        return err

    return check


@pytest.fixture(scope="session")
def assert_same_store():
    """``assert_same_store(store, reference, n_examples=None)``: `store verify` clean, every example of the
    reference exactly once (``n_examples`` of them when given), every hidden and mean value torch.equal."""

    def check(store_path: Path, reference_path: Path, n_examples: int | None = None) -> None:
        from probecache.store.verify import verify_store

        from probecache import open_store

        report = verify_store(store_path)
        assert report.ok, report.problems
        store, reference = open_store(store_path), open_store(reference_path)
        ids = store.manifest(columns=["example_id"])["example_id"].to_pylist()
        expected = reference.manifest(columns=["example_id"])["example_id"].to_pylist()
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(expected)  # each example exactly once
        assert n_examples is None or len(ids) == n_examples
        for eid in expected:
            assert torch.equal(store.hidden(eid), reference.hidden(eid)), eid
        assert torch.equal(store.mean(expected), reference.mean(expected))

    return check
