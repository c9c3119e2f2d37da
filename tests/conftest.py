"""Shared fixtures: a tiny random-init Llama with a byte-level tokenizer, built locally (no downloads)."""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
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


# ---- a real S3 server (moto) for the remote tests and the root contract tests -------------------------------
#
# A real S3 server for the remote tests: moto's server in a subprocess on a free loopback port.
#
# `s3` (session) starts it with access control on: after the setup requests (two IAM users with their
# policies and keys, one bucket) every request must be signed by a user whose policy allows it. The `writer`
# may do anything, the `reader` only GetObject and ListBucket (checked once at start: a moto that denies the reader
# a listing fails the session naming the cause). `s3_env` (per test) puts the writer's keys and the endpoint into
# the standard AWS_* variables, a fresh $PROBECACHE_CACHE (staging and mirror) and a unique prefix in the bucket;
# the variables exist only inside the test (monkeypatch).
#
# `restartable_s3` (per test) is a second server without access control that records its mutating requests,
# so it can be SIGKILLed and started again with its data (see s3server.py).

SERVER = Path(__file__).resolve().parent / "remote" / "s3server.py"
BUCKET = "probecache-team"
REGION = "us-east-1"
SETUP_REQUESTS = 7  # 2 x (create_user, put_user_policy, create_access_key) + create_bucket
READ_ONLY = ["s3:GetObject", "s3:ListBucket"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(SERVER), str(port), *extra], stdout=subprocess.PIPE,
                            stderr=open(log, "ab"), text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the S3 test server did not start (log: {log}): {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        proc.wait(timeout=30)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    writer: tuple[str, str]
    reader: tuple[str, str]
    proc: subprocess.Popen
    log: Path

    def env(self, user: str = "writer") -> dict[str, str]:
        key, secret = getattr(self, user)
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": REGION}

    def boto(self, service: str = "s3", user: str = "writer"):
        import boto3

        key, secret = getattr(self, user)
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key,
                            aws_secret_access_key=secret)


def check_access_control(server: S3Server) -> None:
    """The server must check signatures and policies as S3 does, or every remote test fails for a reason that is
    moto's, not ours: moto < 5.2.4 checks signatures against a percent-decoded URL (SignatureDoesNotMatch on any
    listing with a prefix), 5.2.6 authorizes ListObjectsV2 as "s3:ListObjectsV2" instead of s3:ListBucket
    (AccessDenied for the reader). Say so once, with the fix."""
    from botocore.exceptions import ClientError

    try:
        server.boto(user="reader").list_objects_v2(Bucket=server.bucket, Prefix="access/check/")
    except ClientError as e:
        import moto

        pytest.fail(f"moto {moto.__version__}: the read-only user's ListObjectsV2 with a prefix got "
                    f"{e.response['Error']['Code']} (a moto bug, not a product one): install the pinned test "
                    "dependencies, `pip install -c constraints.txt -e '.[dev]'`", pytrace=False)


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    import boto3

    folder = tmp_path_factory.mktemp("s3")
    port = free_port()
    proc = start_server(port, folder / "server.log", "--auth-after", str(SETUP_REQUESTS))
    endpoint = f"http://127.0.0.1:{port}"
    setup = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", READ_ONLY)):
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (created["AccessKeyId"], created["SecretAccessKey"])
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    server = S3Server(endpoint, BUCKET, keys["writer"], keys["reader"], proc, folder / "server.log")
    try:
        check_access_control(server)
        yield server
    finally:
        stop(proc)


@dataclass
class S3Env:
    server: S3Server
    root: str  # s3://bucket/<unique prefix>: this test's store root
    cache: Path
    monkeypatch: pytest.MonkeyPatch
    user: str = "writer"
    extra: dict = field(default_factory=dict)

    def use(self, user: str) -> None:
        """Switch the AWS_* variables to another user's keys (``reader``: read-only)."""
        self.user = user
        for name, value in self.server.env(user).items():
            self.monkeypatch.setenv(name, value)

    def subprocess_env(self, user: str | None = None, **more: str) -> dict[str, str]:
        """os.environ (as patched) for a `probecache` subprocess, optionally as another user."""
        env = {**os.environ, **self.server.env(user or self.user), **more}
        env.pop("PYTEST_CURRENT_TEST", None)
        return env


@pytest.fixture
def s3_env(s3, tmp_path, monkeypatch, request) -> S3Env:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "PROBECACHE_ROOT",
                 "PROBECACHE_REMOTE_CACHE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROBECACHE_CACHE", str(cache))
    monkeypatch.setenv("PROBECACHE_REMOTE_RETRY_SECONDS", "5")
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    env = S3Env(s3, f"s3://{s3.bucket}/t-{name}-{uuid.uuid4().hex[:6]}", cache, monkeypatch)
    env.use("writer")
    return env


@dataclass
class RestartableS3:
    port: int
    record: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_server(self.port, self.log, "--record", str(self.record))

    def kill(self) -> None:
        stop(self.proc, kill=True)


@pytest.fixture
def restartable_s3(tmp_path) -> RestartableS3:
    server = RestartableS3(free_port(), tmp_path / "s3-requests.jsonl", tmp_path / "s3-restart.log")
    server.start()
    yield server
    if server.proc is not None:
        stop(server.proc)
