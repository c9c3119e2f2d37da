"""What readers check before they return a value: part digests, the store.json seal, the header against the
arrays and the manifest, and every segment file against its commit record (the corruption matrix in
tests/faults/test_corruption.py runs these through every consumer; here each check on its own)."""

from __future__ import annotations

import json
import mmap
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from probecache.manifests.schema import DIGEST_KEY, ManifestError, read_part
from probecache.store.errors import StoreError
from probecache.store.header import SEAL, seal_header
from probecache.store.integrity import crc32c_hex
from probecache.store.verified import CheckedFiles, read_off_heap

from probecache import open_store


@pytest.fixture(scope="module")
def intact(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("read-checks") / "stores", sentiment_csv).path


@pytest.fixture
def store(intact, tmp_path):
    """A private copy of the intact store (each test damages its own)."""
    return shutil.copytree(intact, tmp_path / intact.name)


def _rewrite_part(path, edit) -> None:
    """Rewrite a part with ``edit`` applied to its rows but its original metadata (digest included) kept: what
    a bit flip that pyarrow still parses looks like to a reader."""
    table = pq.read_table(path)
    pq.write_table(edit(table).replace_schema_metadata(table.schema.metadata), path)


def _all_values(path) -> tuple[list, torch.Tensor]:
    store = open_store(path)
    ids = store.manifest(columns=["example_id"])["example_id"].to_pylist()
    return [store.hidden(e) for e in ids], store.mean(ids)


def test_a_part_whose_values_changed_is_refused(store):
    part = store / "manifests" / "part-00000.parquet"
    zeros = pa.array([0] * pq.read_table(part).num_rows, pa.int32())
    _rewrite_part(part, lambda t: t.set_column(t.schema.get_field_index("label"), "label", zeros))
    with pytest.raises(ManifestError, match="do not match the checksum"):
        read_part(part)
    with pytest.raises(StoreError, match="part-00000.parquet is damaged"):
        open_store(store).manifest()


def test_a_part_written_before_digests_is_still_read(store, intact):
    for part in (store / "manifests").glob("part-*.parquet"):
        table = pq.read_table(part)
        meta = {k: v for k, v in table.schema.metadata.items() if k != DIGEST_KEY}
        pq.write_table(table.replace_schema_metadata(meta), part)
    hidden, mean = _all_values(store)
    expected_hidden, expected_mean = _all_values(intact)
    assert all(torch.equal(a, b) for a, b in zip(hidden, expected_hidden, strict=True))
    assert torch.equal(mean, expected_mean)


def test_an_edited_store_json_is_refused_and_an_unsealed_one_is_cross_checked(store):
    path = store / "store.json"
    info = json.loads(path.read_text())
    info["dataset"]["label_names"] = info["dataset"]["label_names"][::-1]
    path.write_text(json.dumps(info))
    with pytest.raises(StoreError, match="do not match the checksum"):
        open_store(store)

    # a header from before the seal: the swapped names are caught by the manifest's label_name column
    del info[SEAL]
    path.write_text(json.dumps(info))
    with pytest.raises(StoreError, match="label_names .* disagree with the manifest"):
        open_store(store).manifest()

    # and an edited dtype by the arrays themselves
    info["dataset"]["label_names"] = info["dataset"]["label_names"][::-1]
    info["logical_dtype"] = "float16"
    path.write_text(json.dumps(info))
    reader = open_store(store)
    eid = reader.manifest(columns=["example_id"])["example_id"][0].as_py()
    with pytest.raises(StoreError, match="store.json says float16 values"):
        reader.hidden(eid)


def test_a_sealed_header_round_trips_and_a_truncated_one_is_one_line(store):
    info = json.loads((store / "store.json").read_text())
    assert json.loads(seal_header(info)) == info  # sealing a sealed header changes nothing
    (store / "store.json").write_bytes((store / "store.json").read_bytes()[:100])
    with pytest.raises(StoreError, match="store.json is damaged") as e:
        open_store(store)
    assert "\n" not in str(e.value)


def test_a_flipped_chunk_byte_is_an_error_naming_the_file(store):
    reader = open_store(store)
    segment = reader.manifest(columns=["segment"])["segment"][0].as_py()
    chunk = next(p for p in sorted((store / "segments" / segment / "hidden" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    eid = reader.manifest(columns=["example_id"])["example_id"][0].as_py()
    with pytest.raises(StoreError, match=rf"{segment}/hidden/c/.* is corrupted"):
        open_store(store).hidden(eid)


def test_files_outside_the_commit_record_are_never_read(store, intact):
    """A stray chunk key next to a committed segment (an interrupted overwrite, a foreign tool) is invisible."""
    reader = open_store(store)
    segment = reader.manifest(columns=["segment"])["segment"][0].as_py()
    (store / "segments" / segment / "mean" / "c" / "9").mkdir(parents=True)
    (store / "segments" / segment / "mean" / "c" / "9" / "0").write_bytes(b"garbage")
    train = open_store(store).manifest(split="train", columns=["example_id"])["example_id"].to_pylist()
    assert torch.equal(open_store(store).mean(train), open_store(intact).mean(train))


def test_filters_apply_to_the_checked_manifest(store):
    reader = open_store(store)
    assert reader.manifest(filter=pc.field("n_tokens") > 0).num_rows == reader.manifest().num_rows
    assert set(reader.manifest(split="test", columns=["split"])["split"].to_pylist()) == {"test"}


def test_checked_files_stay_within_their_byte_limit(tmp_path):
    cache = CheckedFiles(limit=100)
    for i in range(5):
        cache.put(tmp_path / str(i), b"x" * 40)
    kept = [i for i in range(5) if cache.get(tmp_path / str(i)) is not None]
    assert kept == [3, 4]  # the two most recent fit in 100 bytes
    cache.put(tmp_path / "big", b"x" * 500)  # the file being read is always kept, alone
    assert cache.get(tmp_path / "big") is not None and cache.get(tmp_path / "4") is None


def test_a_whole_file_is_read_off_the_heap_read_only(tmp_path):
    """Shard files are read into mappings of their own (never heap blocks that fragment it), read-only as bytes
    were: the checked copy cannot be changed by a consumer."""
    payload = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(payload)
    (tmp_path / "empty").write_bytes(b"")
    data = read_off_heap(tmp_path / "f")
    assert len(data) == len(payload) and data.tobytes() == payload and crc32c_hex(data) == crc32c_hex(payload)
    assert isinstance(data.base.obj, mmap.mmap)  # numpy over a memoryview of the mapping
    with pytest.raises(ValueError, match="read-only"):
        data[0] = 1
    assert read_off_heap(tmp_path / "empty") == b""


def test_store_ls_lists_a_damaged_store_instead_of_failing(intact, tmp_path):
    from probecache.store.reader import list_stores
    from typer.testing import CliRunner

    from probecache.cli import app

    root = tmp_path / "root"
    shutil.copytree(intact, root / intact.name)
    broken = shutil.copytree(intact, root / "broken-copy")
    (broken / "store.json").write_bytes(b'{"format_vers')
    listed = {s["store_id"]: s for s in list_stores(root)}
    assert "damaged" not in listed[intact.name] and "store.json is damaged" in listed["broken-copy"]["damaged"]
    result = CliRunner().invoke(app, ["store", "ls", str(root)])
    assert result.exit_code == 0 and "damaged" in result.stdout and intact.name in result.stdout, result.output


def test_verify_notes_a_store_from_before_the_seals(store):
    from probecache.store.verify import verify_store

    assert not any("checksum" in n or "digest" in n for n in verify_store(store).notes)
    info = json.loads((store / "store.json").read_text())
    del info[SEAL]
    (store / "store.json").write_text(json.dumps(info))
    part = store / "manifests" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata(
        {k: v for k, v in table.schema.metadata.items() if k != DIGEST_KEY}), part)
    report = verify_store(store)
    assert report.ok, report.problems
    assert any("store.json carries no checksum" in n for n in report.notes)
    assert any("1 parts carry no content digest" in n for n in report.notes)
