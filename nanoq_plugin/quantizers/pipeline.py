"""The layer-by-layer quantization pipeline: read a source lazily, quantize one decoder block at a time,
stream the packed tensors to a temp dir, and rename the finished checkpoint into place."""

from __future__ import annotations

import ctypes
import datetime
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..errors import NanoqError
from ..example_model import MARKER_NAME as EXAMPLE_MARKER_NAME
from ..format.checkpoint import SIDE_FILES, CheckpointWriter, SourceCheckpoint
from ..format.layout import TensorSpec, param_specs, stored_bytes
from ..format.manifest import MANIFEST_NAME, ModuleRecord, build_manifest
from ..format.quant_config import NanoQuantConfig
from ..format.reference import dequantize
from ..format.schemes import Scheme
from .architectures import Architecture, architecture_for
from .recipe import Plan, Recipe, resolve_plan
from .rtn import quantize_rtn


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint` made: the output folder, its manifest, timing and peak memory."""

    output: Path
    manifest: dict
    seconds: float
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and peak RSS creeps up per block)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoqError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise NanoqError(f"--device {device!r}: choose cpu or cuda")
    return torch.device(device)


def _block_linear_shapes(source: SourceCheckpoint, arch: Architecture, num_layers: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for index in range(num_layers):
        for module in arch.linears_of_block(index):
            name = f"{module}.weight"
            if name not in source:
                raise NanoqError(f"{source.directory}: tensor '{name}' is missing from the safetensors files")
            shape = source.shape(name)
            if len(shape) != 2:
                raise NanoqError(f"{source.file_of(name)}: tensor '{name}' has shape {list(shape)}, expected [out, in]")
            shapes[module] = (shape[0], shape[1])
    return shapes


def _versions() -> dict:
    import safetensors
    import transformers

    return {
        "nanoq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _quantize_module(weight: torch.Tensor, scheme: Scheme, requested: Scheme, device: torch.device):
    source = weight.to(device=device, dtype=torch.float32)
    tensors = quantize_rtn(source, scheme)
    restored = dequantize(tensors, scheme, *source.shape)
    rel_error = (torch.linalg.norm(restored - source) / torch.linalg.norm(source).clamp_min(1e-30)).item()
    specs = param_specs(scheme, *source.shape)
    record = ModuleRecord(
        scheme=scheme,
        requested_scheme=requested,
        shape=tuple(source.shape),
        source_dtype=weight.dtype,
        stored_bytes=stored_bytes(specs),
        rel_error=rel_error,
        tensors=specs,
    )
    return tensors, record


def _provenance(source: SourceCheckpoint, recipe: Recipe, calibration: str | None) -> dict:
    provenance = {
        "source": str(source.directory.resolve()),
        "source_model": source.config.get("_name_or_path") or source.directory.name,
        "recipe": recipe.to_dict(),
        "calibration": {"file": str(Path(calibration).resolve()), "used": False,
                        "note": f"{recipe.method} uses no calibration data"} if calibration else None,
        "seed": 0,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    if (source.directory / EXAMPLE_MARKER_NAME).exists():
        provenance["example_model_note"] = (
            "SmolLM2-135M-Instruct from a Q4_1 GGUF: a 4-bit group-32 asymmetric result on it is "
            "trivially lossless and is not evidence of quality"
        )
    return provenance


def quantize_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: Recipe,
    device: str = "cpu",
    calibration: str | None = None,
    progress: bool = True,
    max_shard_bytes: int = 512 * 2**20,
) -> QuantizeResult:
    """Quantize the Hugging Face checkpoint in `source_dir` with `recipe` into `output_dir`.

    Holds one decoder block's tensors (plus at most one output shard) in memory at a time. All checks on
    the source and the plan run before any tensor is quantized; the output appears only when complete.
    """
    start = time.perf_counter()
    torch_device = _resolve_device(device)
    source = SourceCheckpoint(source_dir)
    arch = architecture_for(source.config, str(source.directory / "config.json"))
    if "quantization_config" in source.config:
        method = source.config["quantization_config"].get("quant_method")
        raise NanoqError(f"{source.directory / 'config.json'}: already quantized (quant_method {method!r}); "
                         "quantize from a float checkpoint")
    num_layers = source.config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise NanoqError(f"{source.directory / 'config.json'}: missing or invalid num_hidden_layers")
    if calibration is not None and not Path(calibration).is_file():
        raise NanoqError(f"--calib {calibration}: file not found")
    tables = {m: tuple(source.shape(f"{m}.weight")) for m in (arch.embedding, arch.lm_head) if f"{m}.weight" in source}
    tied = bool(source.config.get("tie_word_embeddings", False))
    plan: Plan = resolve_plan(recipe, arch, _block_linear_shapes(source, arch, num_layers), tables, tied)

    by_block: dict[int | None, list[str]] = {}
    for name in source.keys():
        by_block.setdefault(arch.block_of(name), []).append(name)
    unknown_blocks = sorted(b for b in by_block if b is not None and b >= num_layers)
    if unknown_blocks:
        raise NanoqError(f"{source.directory}: tensors for block {unknown_blocks[0]} but num_hidden_layers is {num_layers}")

    records: dict[str, ModuleRecord] = {}
    float_specs: dict[str, TensorSpec] = {}
    with CheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes) as writer:

        def write(names: list[str]) -> None:
            """Quantize the planned modules among `names`, copy the rest in their stored dtype."""
            for name, tensor in source.items(names):
                if plan.tied_lm_head is not None and name == f"{arch.lm_head}.weight":
                    continue  # the head is the quantized embedding table
                module = name.removesuffix(".weight")
                planned = plan.modules.get(module) if name.endswith(".weight") else None
                if planned is None or not planned.scheme.is_quantized:
                    writer.add(name, tensor)
                    float_specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
                    continue
                tensors, record = _quantize_module(tensor, planned.scheme, planned.requested, torch_device)
                for part, value in tensors.items():
                    writer.add(f"{module}.{part}", value)
                records[module] = record

        write(by_block.get(None, []))
        bar = tqdm(range(num_layers), desc="quantize", unit="block", disable=not progress)
        for index in bar:
            write(by_block.get(index, []))
            release_freed_memory()
            bar.set_postfix(peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")

        quant_config = NanoQuantConfig(modules=plan.quantized(), tied_lm_head=plan.tied_lm_head)
        config = dict(source.config)
        config["quantization_config"] = quant_config.to_dict()
        provenance = _provenance(source, recipe, calibration)
        manifest = build_manifest(records, float_specs, provenance)
        copies = [source.directory / f for f in SIDE_FILES if (source.directory / f).is_file()]
        output = writer.commit({"config.json": config, MANIFEST_NAME: manifest}, copies)
    return QuantizeResult(output, manifest, time.perf_counter() - start, peak_rss_bytes())
