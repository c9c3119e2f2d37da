"""A real S3 server for the remote tests: moto's server in a subprocess on a free loopback port.

`s3` (session) starts it with access control on: after the setup requests (two IAM users with their
policies and keys, one bucket) every request must be signed by a user whose policy allows it. The `writer`
may do anything, the `reader` only GetObject and ListBucket (checked once at start: a moto that denies the reader
a listing fails the session naming the cause). `s3_env` (per test) puts the writer's keys and the endpoint into
the standard AWS_* variables, a fresh $PROBECACHE_CACHE (staging and mirror) and a unique prefix in the bucket;
the variables exist only inside the test (monkeypatch).

`restartable_s3` (per test) is a second server without access control that records its mutating requests,
so it can be SIGKILLed and started again with its data (see s3server.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SERVER = HERE / "s3server.py"
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


@pytest.fixture(scope="session")
def tiny_remote_source(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    """One local store (60 examples, 8 shards) that read/push/pull tests copy to the server."""
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("remote-src") / "stores", sentiment_csv)
