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
from .block_runner import BlockRunner
from .calibration import calibration_windows
from .gptq import GptqSettings, HessianAccumulator, gptq_quantize
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
    """RTN: stored tensors and the manifest record of one module."""
    source = weight.to(device=device, dtype=torch.float32)
    tensors = quantize_rtn(source, scheme)
    return tensors, _module_record(weight.to(device), tensors, scheme, requested)


def _module_record(source_weight: torch.Tensor, tensors: dict, scheme: Scheme, requested: Scheme) -> ModuleRecord:
    original = source_weight.to(torch.float32)
    restored = dequantize(tensors, scheme, *original.shape).to(original.device)
    rel_error = (torch.linalg.norm(restored - original) / torch.linalg.norm(original).clamp_min(1e-30)).item()
    specs = param_specs(scheme, *original.shape)
    return ModuleRecord(scheme=scheme, requested_scheme=requested, shape=tuple(original.shape),
                        source_dtype=source_weight.dtype, stored_bytes=stored_bytes(specs), rel_error=rel_error,
                        tensors=specs)


def _gptq_block(runner: BlockRunner, arch: Architecture, plan: Plan, index: int, tensors: dict[str, torch.Tensor],
                hidden: torch.Tensor, settings: GptqSettings) -> tuple[dict, torch.Tensor]:
    """GPTQ the planned linears of block `index`, group by group (true sequential); returns
    module -> (stored tensors, record) and the block's output computed with its quantized weights."""
    block = runner.build(index, tensors, arch.block_prefix)
    results = {}

    def quantize_group(group: tuple[str, ...], inputs: list[torch.Tensor]) -> bool:
        modules = {f"{arch.block_prefix}.{index}.{name}": name for name in group}
        planned = {m: plan.modules[m] for m in modules if m in plan.modules and plan.modules[m].scheme.is_quantized}
        if not planned:
            return False
        hessian = HessianAccumulator(inputs[0].shape[-1], runner.device)
        for chunk in inputs:
            hessian.add(chunk)
        for module, entry in planned.items():
            linear = block.get_submodule(modules[module])
            stored = gptq_quantize(linear.weight.data, hessian.hessian, entry.scheme, settings, where=module)
            results[module] = (stored, _module_record(tensors[f"{module}.weight"], stored, entry.scheme, entry.requested))
            linear.weight.data = dequantize(stored, entry.scheme, *linear.weight.shape).to(runner.device)
        return False  # the group's inputs are unchanged

    return results, runner.walk(block, hidden, quantize_group)


def _provenance(source: SourceCheckpoint, recipe: Recipe, calibration: str | None, calib_info: dict | None) -> dict:
    if calib_info is not None:
        calibration_entry = {"file": str(Path(calibration).resolve()), "used": True, **calib_info}
    elif calibration:
        calibration_entry = {"file": str(Path(calibration).resolve()), "used": False,
                             "note": f"{recipe.method} uses no calibration data"}
    else:
        calibration_entry = None
    provenance = {
        "source": str(source.directory.resolve()),
        "source_model": source.config.get("_name_or_path") or source.directory.name,
        "recipe": recipe.to_dict(),
        "calibration": calibration_entry,
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
    calib_windows: int = 64,
    calib_seq_len: int = 512,
    gptq: GptqSettings = GptqSettings(),
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
    if recipe.method == "gptq" and calibration is None:
        raise NanoqError("method gptq needs calibration text: pass --calib FILE (e.g. WikiText-2 train)")
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

        def write(tensors: dict[str, torch.Tensor], done: dict | None = None) -> None:
            """Store the planned modules among `tensors` quantized (RTN unless `done` holds them already),
            the rest in their stored dtype."""
            for name, tensor in tensors.items():
                if plan.tied_lm_head is not None and name == f"{arch.lm_head}.weight":
                    continue  # the head is the quantized embedding table
                module = name.removesuffix(".weight")
                planned = plan.modules.get(module) if name.endswith(".weight") else None
                if planned is None or not planned.scheme.is_quantized:
                    writer.add(name, tensor)
                    float_specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
                    continue
                if done and module in done:
                    quantized, record = done[module]
                else:
                    quantized, record = _quantize_module(tensor, planned.scheme, planned.requested, torch_device)
                for part, value in quantized.items():
                    writer.add(f"{module}.{part}", value.cpu())
                records[module] = record

        outside = dict(source.items(by_block.get(None, [])))
        hidden = runner = calib_info = None
        if recipe.method == "gptq":
            ids = calibration_windows(source.directory, calibration, calib_windows, calib_seq_len)
            calib_info = {"windows": calib_windows, "seq_len": calib_seq_len, "seed": 0, "damp": gptq.damp,
                          "act_order": gptq.act_order, "clip_search": gptq.clip_search, "static_groups": True,
                          "true_sequential": True}
            runner = BlockRunner(source.config, torch_device)
            hidden = outside[f"{arch.embedding}.weight"].to(device=torch_device, dtype=torch.float32)[ids.to(torch_device)]
        write(outside)
        del outside
        bar = tqdm(range(num_layers), desc=f"quantize ({recipe.method})", unit="block", disable=not progress)
        for index in bar:
            block_tensors = dict(source.items(by_block.get(index, [])))
            done = None
            if runner is not None:
                block_start = time.perf_counter()
                done, hidden = _gptq_block(runner, arch, plan, index, block_tensors, hidden, gptq)
                bar.set_postfix(block_s=f"{time.perf_counter() - block_start:.1f}",
                                peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")
            write(block_tensors, done)
            del block_tensors, done
            release_freed_memory()
            if runner is None:
                bar.set_postfix(peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")

        quant_config = NanoQuantConfig(modules=plan.quantized(), tied_lm_head=plan.tied_lm_head)
        config = dict(source.config)
        config["quantization_config"] = quant_config.to_dict()
        provenance = _provenance(source, recipe, calibration, calib_info)
        manifest = build_manifest(records, float_specs, provenance)
        copies = [source.directory / f for f in SIDE_FILES if (source.directory / f).is_file()]
        output = writer.commit({"config.json": config, MANIFEST_NAME: manifest}, copies)
    return QuantizeResult(output, manifest, time.perf_counter() - start, peak_rss_bytes())
