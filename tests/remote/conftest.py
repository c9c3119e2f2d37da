"""The remote tests' own fixture; the S3 server fixtures (`s3`, `s3_env`, `restartable_s3`) are in
tests/conftest.py, shared with tests/store/test_root_contract.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_remote_source(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    """One local store (60 examples, 8 shards) that read/push/pull tests copy to the server."""
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("remote-src") / "stores", sentiment_csv)
