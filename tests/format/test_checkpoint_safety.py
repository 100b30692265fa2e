"""The format layer's refusals: non-finite values, JSON NaN, shards outside the folder, the tensors a config
needs, and staging folders that killed runs leave behind (locked while their writer lives)."""

import fcntl
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.checkpoint import (
    CheckpointWriter, SourceCheckpoint, first_non_finite, make_staging_dir, make_staging_file, publish_dir,
    read_json, release_staging, write_json,
)
from nanoq_plugin.format.expected_tensors import check_float_tensors, model_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_first_non_finite_finds_the_first_bad_element(dtype):
    tensor = torch.zeros(4, 6, dtype=dtype)
    assert first_non_finite(tensor) is None
    tensor[2, 5] = float("nan")
    tensor[3, 1] = float("nan")
    index, value = first_non_finite(tensor)
    assert index == [2, 5] and value != value
    assert first_non_finite(torch.full((3,), 7, dtype=torch.int32)) is None


def test_source_refuses_a_nan_when_the_tensor_is_read(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weight = torch.ones(3, 4, dtype=torch.bfloat16)
    weight[1, 2] = float("-inf")
    save_file({"w": weight, "ok": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    source = SourceCheckpoint(tmp_path)  # headers only: opening is cheap and succeeds
    assert source.get("ok").sum() == 2
    with pytest.raises(NanoqError, match=r"model\.safetensors: tensor 'w' has a non-finite value \(-inf\) at index \[1, 2\]"):
        source.get("w")


def test_writer_refuses_a_non_finite_tensor_and_leaves_nothing(tmp_path):
    with pytest.raises(NanoqError, match=r"tensor 'm\.scales' would be stored with a non-finite value \(inf\) at index \[1\]"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("m.scales", torch.tensor([1.0, float("inf")], dtype=torch.float16))
    assert os.listdir(tmp_path) == []


def test_json_never_holds_nan(tmp_path):
    with pytest.raises(NanoqError, match=r"'modules\.m\.rel_error' is not a finite number"):
        write_json(tmp_path / "m.json", {"modules": {"m": {"rel_error": float("nan")}}})
    assert os.listdir(tmp_path) == []
    (tmp_path / "n.json").write_text('{"rel_error": NaN}')
    with pytest.raises(NanoqError, match=r"n\.json: not valid JSON \(NaN is not a JSON number\)"):
        read_json(tmp_path / "n.json")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shards_stay_inside_the_folder(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(NanoqError, match="outside the model folder"):
        SourceCheckpoint(folder)


def test_a_tied_head_may_be_stored_or_not(make_tiny_model, tmp_path):
    tied = make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    source = SourceCheckpoint(tied)
    needed = check_float_tensors(source)
    assert "lm_head.weight" not in source and "lm_head.weight" in needed.optional
    assert needed.embedding == "model.embed_tokens" and needed.output == "lm_head"
    untied = model_tensors({**source.config, "tie_word_embeddings": False}, "config.json")
    assert "lm_head.weight" not in untied.optional


def hold(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_dead_runs_staging_is_removed_and_a_live_ones_refused(tmp_path, capfd):
    out = tmp_path / "out"
    dead = tmp_path / ".out.nanoq-tmp-dead0001"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    dead_file = tmp_path / ".out.nanoq-tmp-dead0002"
    dead_file.write_bytes(b"partial")
    unrelated = tmp_path / ".other.nanoq-tmp-keep0001"
    unrelated.mkdir()
    staging = make_staging_dir(out)
    assert not dead.exists() and not dead_file.exists() and unrelated.exists()
    assert f"removed {dead}, left behind by an interrupted run" in capfd.readouterr().err
    with pytest.raises(BlockingIOError):  # the writer holds its lock
        hold(staging)
    release_staging(staging)

    live = tmp_path / ".out.nanoq-tmp-live0001"
    live.mkdir()
    fd = hold(live)  # as another process's writer would
    try:
        with pytest.raises(NanoqError, match=r"out: another nanoq run is writing it .*nanoq-tmp-live0001"):
            make_staging_dir(out)
        with pytest.raises(NanoqError, match="another nanoq run is writing it"):
            make_staging_file(out)
    finally:
        os.close(fd)
    assert live.exists()


def test_a_staging_dir_published_into_another_stays_locked(tmp_path):
    """quantize --e2e-steps writes a checkpoint into its own staging dir, then writes OUT from it: the inner
    publish must not leave the outer staging dir looking abandoned."""
    out = tmp_path / "out"
    outer = make_staging_dir(out)
    inner = make_staging_dir(outer)
    (inner / "x").write_text("x")
    publish_dir(inner, outer)
    with CheckpointWriter(out) as writer:  # clears dead stagings beside OUT: the outer one is alive
        writer.add("w", torch.ones(2))
        writer.commit({})
    assert (outer / "x").is_file() and (out / "model.safetensors").is_file()
    release_staging(outer)
