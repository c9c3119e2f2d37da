"""--model resolution: local folders, hub ids (offline failure and local hub cache), bad specs, dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch
from probecache.lm.errors import ModelError
from probecache.lm.models import resolve_device, resolve_dtype, resolve_model


def test_local_folder_identity_is_the_weights_hash(tiny_model, tiny_model_other_weights, tmp_path):
    a = resolve_model(str(tiny_model))
    assert a.kind == "folder" and a.weights_id.startswith("sha256:")
    moved = tmp_path / "renamed"
    shutil.copytree(tiny_model, moved)
    assert resolve_model(str(moved)).weights_id == a.weights_id  # same weights, any path
    assert resolve_model(str(tiny_model_other_weights)).weights_id != a.weights_id


def _fake_hub_cache(cache, repo: str, model_folder, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """The on-disk layout huggingface_hub itself writes: what a user who downloaded once has offline."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_folder, base / "snapshots" / revision)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return revision


def test_hub_id_resolves_from_the_local_hub_cache_with_its_revision(tiny_model, tmp_path, monkeypatch):
    revision = _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    source = resolve_model("acme/tiny-llama")
    assert source.kind == "hub" and source.weights_id == f"hub:acme/tiny-llama@{revision}"
    assert (source.path / "config.json").is_file()


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as e:
        resolve_model("meta-llama/Llama-3.2-3B-Instruct")
    message = str(e.value)
    assert "\n" not in message and "Hugging Face Hub" in message and "--model smollm2-135m" in message


@pytest.mark.parametrize("spec,match", [
    ("/no/such/folder", "neither an existing folder"),
    ("missing.gguf", "GGUF file .* not found"),
    ("not a model!", "neither"),
])
def test_bad_model_specs(spec, match):
    with pytest.raises(ModelError, match=match):
        resolve_model(spec)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files"):
        resolve_model(str(tmp_path))


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="--dtype"):
        resolve_dtype("int8", "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ModelError, match="no CUDA"):
            resolve_device("cuda")
