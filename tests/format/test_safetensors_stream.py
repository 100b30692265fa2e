"""The streamed safetensors file (format.safetensors_stream) and the shard writer built on it."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.checkpoint import INDEX_NAME, CheckpointWriter
from nanoq_plugin.format.safetensors_stream import DTYPE_NAMES, SafetensorsStream


def _tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype a checkpoint holds, of varied shapes (a scalar, an empty one, odd sizes)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for number, dtype in enumerate(DTYPE_NAMES):
        shape = [(3, 5), (7,), (), (2, 0), (4, 3, 2)][number % 5]
        values = torch.randn(shape, generator=generator) * 50
        out[f"t{number}.{str(dtype).removeprefix('torch.')}"] = values.to(dtype)
    return out


def test_a_streamed_file_reads_back_as_safetensors_wrote_it(tmp_path):
    tensors = _tensors()
    stream = SafetensorsStream(tmp_path / "streamed.safetensors")
    for name, tensor in tensors.items():
        stream.add(name, tensor.t() if tensor.dim() == 2 else tensor)  # a non-contiguous view is written as values
    stream.finish({"format": "pt"})
    save_file({n: (t.t() if t.dim() == 2 else t).contiguous() for n, t in tensors.items()}, tmp_path / "saved.safetensors",
              metadata={"format": "pt"})
    streamed, saved = load_file(tmp_path / "streamed.safetensors"), load_file(tmp_path / "saved.safetensors")
    assert streamed.keys() == saved.keys() == tensors.keys()
    for name in tensors:
        assert streamed[name].dtype == saved[name].dtype and streamed[name].shape == saved[name].shape
        assert torch.equal(streamed[name].view(-1).view(torch.uint8), saved[name].view(-1).view(torch.uint8)), name
    with safe_open(tmp_path / "streamed.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")] == []  # the data file is gone


def test_a_stream_refuses_a_name_twice_and_a_dtype_it_cannot_store(tmp_path):
    stream = SafetensorsStream(tmp_path / "x.safetensors")
    stream.add("a", torch.zeros(2))
    with pytest.raises(NanoqError, match="'a' written twice"):
        stream.add("a", torch.zeros(2))
    with pytest.raises(NanoqError, match="no dtype complex128"):
        stream.add("c", torch.zeros(2, dtype=torch.complex128))
    stream.discard()
    assert list(tmp_path.iterdir()) == []


def test_the_writer_holds_no_tensor_and_cuts_shards_at_the_limit(tmp_path):
    """Each added tensor is on disk once `add` returns (nothing keeps it alive); shards stay within the limit
    unless one tensor is larger; the index maps every tensor; the values read back."""
    tensors = {f"w{i}": torch.full((100 + 50 * i,), float(i), dtype=torch.float32) for i in range(12)}
    limit = 1500  # bytes: a few tensors per shard, and w6..w11 (over 1500 bytes each) alone
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=limit) as writer:
        for name, tensor in tensors.items():
            copy = tensor.clone()
            alive = weakref.ref(copy)
            writer.add(name, copy)
            del copy
            gc.collect()
            assert alive() is None, f"the writer keeps {name} in memory"
        out = writer.commit({})
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert sorted(index) == sorted(tensors)
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    for shard in shards:
        loaded = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= limit or len(loaded) == 1, (shard, size)
        for name, value in loaded.items():
            assert torch.equal(value, tensors[name])


def test_a_source_tensor_is_read_into_one_copy(tmp_path):
    """`SourceCheckpoint.get` of a 64 MiB tensor peaks at about one copy above the process (Linux's peak-RSS
    counter, reset before the read, in a fresh process): copying out of a memory map held the file's pages
    resident beside the copy, two copies at the peak."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak-RSS counter")
    save_file({"w": torch.ones(4096, 8192, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    script = f"""
import torch
from nanoq_plugin.format.checkpoint import SourceCheckpoint

def field(name):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(name))

source = SourceCheckpoint({str(tmp_path)!r})
open("/proc/self/clear_refs", "w").write("5")
start = field("VmRSS")
tensor = source.get("w")
peak = field("VmHWM") - start
assert bool((tensor == 1).all())
print(peak / (tensor.numel() * tensor.element_size()))
"""
    copies = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                  check=True).stdout)
    assert copies < 1.5, f"reading one tensor peaked at {copies:.2f} copies of it"
