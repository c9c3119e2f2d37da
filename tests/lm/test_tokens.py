"""Tokenisation and padding shared by extraction and serving, and the lm stage's place below both phases."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from probecache.lm.errors import ModelError
from probecache.lm.tokens import Tokenisation, encode, pad_batch, pad_token_id, truncate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_raw_encoding_adds_special_tokens_and_truncates_on_either_side(tokenizer):
    texts = ["abcdef", "xy"]
    whole, lengths = encode(texts, tokenizer, Tokenisation("raw", "right", None))
    assert whole == tokenizer(texts, add_special_tokens=True)["input_ids"] and lengths == [len(i) for i in whole]
    right, right_lengths = encode(texts, tokenizer, Tokenisation("raw", "right", 3))
    left, _ = encode(texts, tokenizer, Tokenisation("raw", "left", 3))
    assert right == [ids[:3] for ids in whole] and left == [ids[-3:] for ids in whole]
    assert right_lengths == lengths  # the untruncated counts, whatever was kept


def test_chat_encoding_is_the_template_with_the_generation_prompt_and_no_second_bos(tokenizer):
    ids, _ = encode(["hi"], tokenizer, Tokenisation("chat", "right", None))
    assert tokenizer.decode(ids[0]) == "<s>user: hi</s><s>assistant:"


def test_chat_encoding_without_a_template_names_the_fix(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(ModelError, match="no chat template: use --prompt-format raw"):
        encode(["hi"], tokenizer, Tokenisation("chat", "right", 8))


@pytest.mark.parametrize("fields,match", [
    (("json", "right", 8), "prompt format 'json'"),
    (("raw", "middle", 8), "truncation side 'middle'"),
    (("raw", "left", 0), "max_tokens must be a positive integer"),
    (("raw", "left", 2.5), "max_tokens must be a positive integer"),
])
def test_bad_tokenisations_are_refused(fields, match):
    with pytest.raises(ModelError, match=match):
        Tokenisation(*fields)


def test_truncate_keeps_short_prompts_whole():
    assert truncate([[1, 2], [1, 2, 3, 4]], Tokenisation("raw", "left", 3)) == [[1, 2], [2, 3, 4]]
    assert truncate([[1, 2], [1, 2, 3, 4]], Tokenisation("raw", "right", 3)) == [[1, 2], [1, 2, 3]]


def test_pad_batch_on_each_side():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([(5, 6, 7), (8,)], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_token_id_prefers_the_tokenizer_then_the_config():
    class Holder:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    assert pad_token_id(Holder(pad_token_id=3, eos_token_id=4)) == 3
    assert pad_token_id(Holder(pad_token_id=None, eos_token_id=4)) == 4
    assert pad_token_id(None, Holder(pad_token_id=None, eos_token_id=[7, 8])) == 7
    assert pad_token_id(Holder(pad_token_id=None, eos_token_id=None)) == 0


def _imports(folder: Path) -> set[str]:
    """Every module a folder's sources import (absolute names; relative imports stay inside the folder)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_lm_sits_below_every_other_stage_and_serve_does_not_reach_into_extract():
    lm = {n for n in _imports(REPO / "lm") if n.startswith("probecache")}
    assert lm <= {"probecache.lm"} | {n for n in lm if n.startswith("probecache.lm.")}, lm
    assert not [n for n in _imports(REPO / "serve") if n.startswith("probecache.extract")]


def test_the_package_constants_import_without_torch():
    # the CLI reads DEFAULT_MODEL through extract/config.py before it knows whether a command needs torch
    code = "import sys, probecache.lm, probecache.lm.errors; print(probecache.lm.DEFAULT_MODEL, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["smollm2-135m", "False"]
