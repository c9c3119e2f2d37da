"""A root that cannot hold stores (a file in the way, a read-only or unreadable folder) is one `error:` line and
exit code 2 for `extract` and `store ls`, never a traceback, and `extract` says so before any data, tokenizer or
model work (these runs name a dataset that does not exist: the root error must come first).

The tests run as root in CI, and root ignores permission bits, so a read-only folder is a 0o555 folder plus, for
root only, an `os.access` that answers from the permission bits as access(2) does for any other user (access(2)
also answers EROFS for a read-only filesystem, even to root, which is what the code relies on there).
"""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()
NO_DATA = ["extract", "--dataset", "no-such-dataset", "--no-progress"]  # would fail later, if the root passed


@pytest.fixture
def unprivileged_access(monkeypatch):
    """Permission bits count even for root (see the module docstring)."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        if not real(path, mode, *args, **kwargs):
            return False
        need = (0o400 if mode & os.R_OK else 0) | (0o200 if mode & os.W_OK else 0) | (0o100 if mode & os.X_OK else 0)
        return os.stat(path).st_mode & need == need

    monkeypatch.setattr(os, "access", access)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


def test_extract_root_on_a_file(a_file, one_line_error, tiny_model, tiny_csv):
    one_line_error(runner.invoke(app, [*NO_DATA, "--root", str(a_file)]), str(a_file), "not a folder")
    # with data and a model that would work (the old code got as far as the store header, then a traceback)
    real = ["extract", "--dataset", f"csv:{tiny_csv}", "--model", str(tiny_model), "--dtype", "fp32", "--no-progress"]
    one_line_error(runner.invoke(app, [*real, "--root", str(a_file)]), str(a_file), "not a folder")
    one_line_error(runner.invoke(app, [*NO_DATA, "--root", str(a_file / "sub")]), str(a_file), "in the way")
    assert a_file.read_text() == "not a folder"


def test_extract_root_on_a_file_through_the_environment(a_file, one_line_error, monkeypatch):
    monkeypatch.setenv("PROBECACHE_ROOT", str(a_file))
    one_line_error(runner.invoke(app, NO_DATA), str(a_file), "not a folder")


def test_extract_root_in_a_read_only_folder(tmp_path, unprivileged_access, one_line_error):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        one_line_error(runner.invoke(app, [*NO_DATA, "--root", str(folder)]), str(folder), "not writable")
        one_line_error(runner.invoke(app, [*NO_DATA, "--root", str(folder / "a" / "b")]), "not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_store_ls_on_a_file(a_file, one_line_error):
    one_line_error(runner.invoke(app, ["store", "ls", str(a_file)]), str(a_file), "is a file")


def test_store_ls_reads_a_read_only_root_and_refuses_an_unreadable_one(tmp_path, unprivileged_access,
                                                                       one_line_error):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)  # listing needs no write access
    try:
        result = runner.invoke(app, ["store", "ls", str(folder)])
        assert result.exit_code == 0 and "no stores under" in result.stdout, result.output
        folder.chmod(0o311)
        one_line_error(runner.invoke(app, ["store", "ls", str(folder)]), str(folder), "cannot be read")
    finally:
        folder.chmod(0o755)


def test_extract_refuses_a_bad_url_root_before_any_data_work(one_line_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(runner.invoke(app, [*NO_DATA, "--root", "HTTP://host/p"]), "unsupported URL scheme http://")
    one_line_error(runner.invoke(app, [*NO_DATA, "--root", "s3://bucket/p?x=1"]), "query strings")
    assert list(tmp_path.iterdir()) == []
