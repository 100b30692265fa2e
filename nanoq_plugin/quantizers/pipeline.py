"""The layer-by-layer quantization pipeline: read a source lazily, quantize one decoder block at a time,
stream the packed tensors to a temp dir, and rename the finished checkpoint into place."""

from __future__ import annotations

import ctypes
import datetime
import os
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..errors import NanoqError
from ..example_model import MARKER_NAME as EXAMPLE_MARKER_NAME
from ..format.checkpoint import SIDE_FILES, CheckpointWriter, SourceCheckpoint, make_staging_dir
from ..format.layout import TensorSpec, param_specs, stored_bytes
from ..format.manifest import MANIFEST_NAME, ModuleRecord, build_manifest
from ..format.quant_config import NanoQuantConfig
from ..format.reference import dequantize
from ..format.schemes import Scheme, SchemeKind
from .architectures import Architecture, open_float_source
from .recipe import AWQ_METHODS, CALIBRATED_METHODS, Plan, PlannedModule, Recipe, resolve_plan
from .allocator import allocate, apply_allocation, build_units, measure_group, weigh_errors
from .awq import search_scales
from .block_runner import ATTENTION_INPUT, MLP_INPUT, MLP_OUTPUT, BlockRunner, resolve_device
from .block_tuning import TUNABLE_KINDS, TunableLinear, norm_weights, tune_block
from .calibration import SELF, calibration_windows
from .codebook import quantize_codebook
from .data_free import quantize_data_free
from .nvfp4 import global_scale_for, packed_entropy_bits, quantize_nvfp4
from .gptq import HessianAccumulator, flush_denormals, gptq_quantize
from .loss_weights import head_loss_gradient, residual_fisher
from .model_tuning import tune_checkpoint
from .settings import GptqSettings, ModelTuneSettings, TuneSettings
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


def _quantize_module(weight: torch.Tensor, scheme: Scheme, requested: Scheme, device: torch.device,
                     global_scale: torch.Tensor | None = None, alpha: float = 1.0):
    """RTN (NVFP4 with `global_scale` and `alpha`): stored tensors and the manifest record of one module."""
    source = weight.to(device=device, dtype=torch.float32)
    if scheme.kind is SchemeKind.NVFP4:
        tensors = quantize_nvfp4(source, scheme, global_scale, alpha)
        record = _module_record(source, weight.dtype, tensors, scheme, requested)
        record.packed_entropy_bits = packed_entropy_bits(tensors["qweight"])
        return tensors, record
    tensors = quantize_data_free(source, scheme)
    return tensors, _module_record(source, weight.dtype, tensors, scheme, requested)


def _nvfp4_global_scales(tensors: dict[str, torch.Tensor], plan: Plan, arch: Architecture,
                         alpha: float) -> dict[str, torch.Tensor]:
    """Module -> NVFP4 global scale `[1]` for the nvfp4 modules among `tensors`; the parts of a fused q/k/v or
    gate/up share one, from their joint amax (engines and compressed-tensors keep one per fused layer)."""
    modules = {name.removesuffix(".weight") for name in tensors if name.endswith(".weight")}
    nvfp4 = {m for m in modules if m in plan.modules and plan.modules[m].scheme.kind is SchemeKind.NVFP4}
    scales: dict[str, torch.Tensor] = {}
    for module in sorted(nvfp4):
        if module in scales:
            continue
        group = [module]
        stem, _, name = module.rpartition(".")
        parent, _, owner = stem.rpartition(".")
        for fused in arch.fused_groups:
            if f"{owner}.{name}" in fused:
                group = [f"{parent}.{part}" for part in fused if f"{parent}.{part}" in nvfp4]
        amax = max(tensors[f"{m}.weight"].abs().max().item() for m in group)
        for m in group:
            scales[m] = global_scale_for(amax, alpha)
    return scales


def _module_record(reference: torch.Tensor, source_dtype: torch.dtype, tensors: dict, scheme: Scheme,
                   requested: Scheme, restored: torch.Tensor | None = None) -> ModuleRecord:
    """The manifest record of a module stored as `tensors`; `reference [N, K]` is the float weight they encode
    (the source weight, times AWQ's scales where they were folded in); `restored` is their dequantization
    when the caller has it already."""
    original = reference.to(torch.float32)
    if restored is None:
        restored = dequantize(tensors, scheme, *original.shape)
    restored = restored.to(device=original.device, dtype=torch.float32)
    rel_error = (torch.linalg.norm(restored - original) / torch.linalg.norm(original).clamp_min(1e-30)).item()
    specs = param_specs(scheme, *original.shape)
    return ModuleRecord(scheme=scheme, requested_scheme=requested, shape=tuple(original.shape),
                        source_dtype=source_dtype, stored_bytes=stored_bytes(specs), rel_error=rel_error,
                        tensors=specs)


# GPTQ's own dampening after AWQ scaled a Hessian that was damped before scaling (numerical safety only)
PREDAMPED = 1e-6
# AWQ folds a group's input scale into the op that produces the group's input (o_proj has none: with grouped
# query attention its input channels do not map one to one onto v_proj's outputs).
AWQ_PRODUCERS = {ATTENTION_INPUT: "input_layernorm", MLP_INPUT: "post_attention_layernorm", MLP_OUTPUT: "mlp.up_proj"}


class _CalibratedBlock:
    """Quantizes the planned linears of one decoder block with a calibrated method while the block runner
    walks it (true sequential): GPTQ, AWQ (scales + clip-searched RTN), or AWQ scales then GPTQ."""

    def __init__(self, runner: BlockRunner, arch: Architecture, plan: Plan, index: int,
                 tensors: dict[str, torch.Tensor], method: str, settings: GptqSettings,
                 tune: TuneSettings = TuneSettings()) -> None:
        self.runner, self.plan, self.tensors, self.settings, self.tune = runner, plan, tensors, settings, tune
        self.prefix = f"{arch.block_prefix}.{index}"
        self.block = runner.build(index, tensors, arch.block_prefix)
        self.use_awq, self.use_gptq = method in AWQ_METHODS, method in ("gptq", "awq-gptq")
        self.results: dict[str, tuple[dict, ModuleRecord]] = {}
        self.references: dict[str, torch.Tensor] = {}  # module -> the float weight its stored tensors encode
        self.awq_ratios: dict[str, float] = {}
        self.tuning: dict | None = None

    def run(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output `[B, L, H]` with its quantized weights; `results` holds the stored tensors.
        With `targets [B, L, H]` (the float model's block outputs) and tuning on, the quantized block's
        scales, levels and norms are then fitted to them (quantizers.block_tuning)."""
        with flush_denormals():
            output = self.runner.walk(self.block, hidden, self.visit)
            if targets is None or not self.tune.enabled:
                return output
            self._tune(hidden, targets)
            return self.runner.forward(self.block, hidden) if self.tuning["kept"] else output

    def _tune(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit the continuous parameters of the block's quantized linears and norms to `targets`."""
        tunables = {}
        for module, (stored, record) in self.results.items():
            if record.scheme.kind in TUNABLE_KINDS:
                tunables[module.removeprefix(f"{self.prefix}.")] = TunableLinear(stored, record.scheme, *record.shape,
                                                                                 self.runner.device)
        self.tuning = tune_block(self.block, self.runner.call, tunables, hidden, targets, self.tune)
        if not self.tuning["kept"]:
            return
        for name, tunable in tunables.items():
            record = self.results[f"{self.prefix}.{name}"][1]
            self._hold(name, tunable.stored(), record.scheme, record.requested_scheme, record.source_dtype)
        for name in norm_weights(self.block):
            self._store_float(name)

    def _hold(self, name: str, stored: dict[str, torch.Tensor], scheme: Scheme, requested: Scheme,
              source_dtype: torch.dtype) -> None:
        """Take `stored` as linear `name`'s result (recorded against its float reference in `references`)
        and run the block on its dequantization from here on."""
        module = f"{self.prefix}.{name}"
        linear = self.block.get_submodule(name)
        restored = dequantize(stored, scheme, *linear.weight.shape).to(linear.weight.device)
        self.results[module] = (stored, _module_record(self.references[module], source_dtype, stored, scheme,
                                                       requested, restored))
        linear.weight.data = restored

    def _planned(self, group: tuple[str, ...]) -> dict[str, PlannedModule]:
        entries = {name: self.plan.modules.get(f"{self.prefix}.{name}") for name in group}
        return {name: e for name, e in entries.items() if e is not None and e.scheme.is_quantized}

    def _store_float(self, name: str) -> None:
        """Write a float module's (scaled) weight back to the tensors the block is saved from."""
        key = f"{self.prefix}.{name}"
        self.tensors[key] = self.block.get_submodule(name.removesuffix(".weight")).weight.data.to(self.tensors[key].dtype)

    def _fold_into_producer(self, group: tuple[str, ...], scale: torch.Tensor) -> None:
        """Divide the output channels of the op producing `group`'s input by `scale [K]`."""
        producer = AWQ_PRODUCERS[group]
        module = self.block.get_submodule(producer)
        key = f"{self.prefix}.{producer}"
        if key in self.results:  # a quantized linear: its per-output-channel scales absorb the division
            stored, record = self.results[key]
            stored["scales"] = (stored["scales"].to(torch.float32) / scale).to(stored["scales"].dtype)
            self.references[key] = self.references[key] / scale.unsqueeze(1)
            self._hold(producer, stored, record.scheme, record.requested_scheme, record.source_dtype)
            return
        weight = module.weight.data
        module.weight.data = weight / (scale if weight.dim() == 1 else scale.unsqueeze(1))
        self._store_float(f"{producer}.weight")
        module.weight.data = self.tensors[f"{key}.weight"].to(torch.float32).to(weight.device)  # as stored

    def visit(self, group: tuple[str, ...], inputs: list[torch.Tensor]) -> bool:
        planned = self._planned(group)
        if not planned:
            return False
        hessian = HessianAccumulator(inputs[0].shape[-1], self.runner.device)
        abs_sum = torch.zeros(inputs[0].shape[-1], device=self.runner.device)
        for chunk in inputs:
            hessian.add(chunk)
            abs_sum += chunk.abs().sum(dim=tuple(range(chunk.dim() - 1)))
        h = hessian.hessian
        settings = self.settings
        inputs_changed = False
        integer = all(e.scheme.kind in (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL) for e in planned.values())
        if self.use_awq and group in AWQ_PRODUCERS and integer:  # codebook schemes rotate instead
            linears = {name: self.block.get_submodule(name) for name in group}
            scale, ratio = search_scales([linears[n].weight.data for n in planned],
                                         [e.scheme for e in planned.values()], h, abs_sum / hessian.samples)
            self.awq_ratios[f"{self.prefix}.{AWQ_PRODUCERS[group]}"] = ratio
            if ratio >= 0:  # not the identity
                self._fold_into_producer(group, scale)
                for name, linear in linears.items():
                    linear.weight.data = linear.weight.data * scale
                    if name not in planned:
                        self._store_float(f"{name}.weight")
                if self.use_gptq:  # damp in the unscaled input space, where damp · mean(diag H) means what it says
                    h = h.clone()
                    h.diagonal().add_(settings.damp * torch.mean(torch.diag(h)))
                    settings = replace(settings, damp=PREDAMPED)
                h = h / scale.unsqueeze(1) / scale.unsqueeze(0)
                if group == MLP_OUTPUT:  # the inputs are up_proj's outputs: divide them instead of recomputing
                    for chunk in inputs:
                        chunk.div_(scale)
                else:
                    inputs_changed = True  # a norm: cheap to recompute
        for name, entry in planned.items():
            module = f"{self.prefix}.{name}"
            linear = self.block.get_submodule(name)
            weight = linear.weight.data
            if entry.scheme.kind is SchemeKind.CODEBOOK:
                stored = quantize_codebook(weight, entry.scheme, h if self.use_gptq else None, settings, module)
            elif self.use_gptq:
                stored = gptq_quantize(weight, h, entry.scheme, settings, where=module)
            else:
                stored = quantize_rtn(weight, entry.scheme, clip_search=True)
            self.references[module] = weight
            self._hold(name, stored, entry.scheme, entry.requested, self.tensors[f"{module}.weight"].dtype)
        return inputs_changed


def _provenance(source: SourceCheckpoint, recipe: Recipe, calibration: str | None, calib_info: dict | None) -> dict:
    if calib_info is not None and calibration == SELF:
        calibration_entry = {"file": None, "self_generated": True, "used": True, **calib_info}
    elif calib_info is not None:
        calibration_entry = {"file": str(Path(calibration).resolve()), "used": True, **calib_info}
    elif calibration:
        calibration_entry = {"file": None if calibration == SELF else str(Path(calibration).resolve()),
                             "used": False, "note": f"{recipe.method} uses no calibration data "
                                                    "(the allocator's sensitivity pass may have: see allocation)"}
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


@dataclass(frozen=True)
class AllocationRequest:
    """Mixed precision by measured sensitivity (quantizers.allocator): a size target and the quality gate."""

    candidates: tuple[Scheme, ...]
    target_bpw: float | None = None  # bits per weight over the allocated block linears
    target_bytes: int | None = None  # stored bytes of the whole checkpoint
    windows: int = 32  # calibration windows for the sensitivity pass

    def describe(self) -> dict:
        return {"candidates": [c.name for c in self.candidates], "target_bpw": self.target_bpw,
                "target_bytes": self.target_bytes, "sensitivity_windows": self.windows}


FISHER_WINDOWS = 8  # sensitivity windows whose loss gradient weighs the errors (loss_weights)


def _allocate(source: SourceCheckpoint, arch: Architecture, plan: Plan, request: AllocationRequest, recipe: Recipe,
              shapes: dict[str, tuple[int, int]], num_layers: int, by_block: dict, calibration: str, calib_seq_len: int,
              device: torch.device, progress: bool) -> dict:
    """Measure every unit's sensitivity on the float model, choose schemes into `plan`; returns the record."""
    units = build_units(plan, arch, num_layers, shapes, request.candidates, recipe.name)
    if not units:
        raise NanoqError(f"recipe {recipe.name}: no quantized block linears to allocate")
    unit_of = {m: unit for unit in units for m in unit.modules}
    params = sum(unit.params for unit in units)
    if request.target_bytes is not None:
        other = 0
        for name in source.keys():
            module = name.removesuffix(".weight")
            if module in unit_of and name.endswith(".weight"):
                continue
            if plan.tied_lm_head is not None and module == arch.lm_head:
                continue
            entry = plan.modules.get(module) if name.endswith(".weight") else None
            if entry is not None and entry.scheme.is_quantized:
                other += stored_bytes(param_specs(entry.scheme, *source.shape(name)))
            else:
                other += stored_bytes({name: TensorSpec(tuple(source.shape(name)), source.dtype(name))})
        budget = request.target_bytes - other
        if budget <= 0:
            raise NanoqError(f"--target-size {request.target_bytes}: the tensors kept outside the block linears "
                             f"already take {other} bytes")
    else:
        budget = request.target_bpw * params / 8
    runner = BlockRunner(source.config, device)
    ids = calibration_windows(source.directory, calibration, request.windows, calib_seq_len)
    embedding = dict(source.items([f"{arch.embedding}.weight"]))[f"{arch.embedding}.weight"]
    hidden = embedding.to(device=device, dtype=torch.float32)[ids.to(device)]
    def build_block(index: int) -> torch.nn.Module:
        return runner.build(index, dict(source.items(by_block.get(index, []))), arch.block_prefix)

    block_inputs = []  # the first FISHER_WINDOWS windows' input of every block, for the backward pass
    for index in tqdm(range(num_layers), desc="sensitivity", unit="block", disable=not progress):
        block = build_block(index)
        prefix = f"{arch.block_prefix}.{index}"
        block_inputs.append(hidden[:FISHER_WINDOWS].to(torch.bfloat16))
        hidden = runner.walk(block, hidden, lambda group, inputs: bool(
            measure_group(unit_of, block, prefix, group, inputs)))
        release_freed_memory()
    head_name = f"{arch.lm_head}.weight"
    outside = dict(source.items([f"{arch.final_norm}.weight"] + ([head_name] if head_name in source else [])))
    head = outside.get(head_name, embedding)  # tied: the embedding table
    gradient = head_loss_gradient(hidden[:FISHER_WINDOWS], ids[:FISHER_WINDOWS].to(device),
                                  runner.final_norm(outside[f"{arch.final_norm}.weight"]), head.to(device))
    fisher = residual_fisher(runner, build_block, block_inputs, gradient)
    weigh_errors(units, [fisher[arch.block_of(f"{unit.modules[0]}.weight")] for unit in units])
    choice = allocate(units, budget)
    record = apply_allocation(plan, units, choice)
    return {**request.describe(), "fisher_windows": min(FISHER_WINDOWS, request.windows),
            "block_fisher": [float(f"{f:.4g}") for f in fisher], **record}


def quantize_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: Recipe,
    device: str = "cpu",
    calibration: str | None = None,
    progress: bool = True,
    max_shard_bytes: int = 512 * 2**20,
    calib_windows: int = 128,
    calib_seq_len: int = 512,
    gptq: GptqSettings = GptqSettings(),
    allocation: AllocationRequest | None = None,
    tune: TuneSettings = TuneSettings(),
    e2e: ModelTuneSettings = ModelTuneSettings(),
) -> QuantizeResult:
    """Quantize the Hugging Face checkpoint in `source_dir` with `recipe` into `output_dir`.

    Holds one decoder block's tensors (plus at most one output shard) in memory at a time. All checks on
    the source and the plan run before any tensor is quantized; the output appears only when complete.
    With `e2e` enabled the result is then tuned end to end (quantizers.model_tuning), which holds the whole
    quantized model.
    """
    start = time.perf_counter()
    if e2e.enabled:
        if calibration is None:
            raise NanoqError("--e2e-steps tunes against the float model on calibration text: pass --calib FILE")
        if recipe.method in AWQ_METHODS:
            raise NanoqError(f"--e2e-steps: method {recipe.method} folds scales into the float weights; "
                             "use gptq or rtn")
        staging = make_staging_dir(Path(output_dir).resolve())
        try:
            quantize_checkpoint(source_dir, staging, recipe, device, calibration, progress, max_shard_bytes,
                                calib_windows, calib_seq_len, gptq, allocation, tune)
            tuned = tune_checkpoint(source_dir, staging, output_dir, calibration, replace(e2e, seq_len=calib_seq_len),
                                    device, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return QuantizeResult(tuned.output, tuned.manifest, time.perf_counter() - start, peak_rss_bytes())
    torch_device = resolve_device(device)
    source, arch = open_float_source(source_dir, instead="quantize from a float checkpoint")
    num_layers = source.config["num_hidden_layers"]
    if calibration is not None and calibration != SELF and not Path(calibration).is_file():
        raise NanoqError(f"--calib {calibration}: file not found")
    if tune.enabled and recipe.method not in CALIBRATED_METHODS:
        raise NanoqError(f"--tune-steps fits a calibrated block to the float model: method {recipe.method} is not "
                         f"calibrated (use one of {', '.join(CALIBRATED_METHODS)})")
    if recipe.method in CALIBRATED_METHODS and calibration is None:
        raise NanoqError(f"method {recipe.method} needs calibration text: pass --calib FILE (e.g. WikiText-2 train)")
    tables = {m: tuple(source.shape(f"{m}.weight")) for m in (arch.embedding, arch.lm_head) if f"{m}.weight" in source}
    tied = bool(source.config.get("tie_word_embeddings", False))
    if allocation is not None and calibration is None:
        raise NanoqError("the allocator measures sensitivity on calibration text: pass --calib FILE")
    shapes = _block_linear_shapes(source, arch, num_layers)
    plan: Plan = resolve_plan(recipe, arch, shapes, tables, tied)

    by_block: dict[int | None, list[str]] = {}
    for name in source.keys():
        by_block.setdefault(arch.block_of(name), []).append(name)
    unknown_blocks = sorted(b for b in by_block if b is not None and b >= num_layers)
    if unknown_blocks:
        raise NanoqError(f"{source.directory}: tensors for block {unknown_blocks[0]} but num_hidden_layers is {num_layers}")

    allocation_record = None
    if allocation is not None:
        allocation_record = _allocate(source, arch, plan, allocation, recipe, shapes, num_layers, by_block,
                                      calibration, calib_seq_len, torch_device, progress)

    records: dict[str, ModuleRecord] = {}
    float_specs: dict[str, TensorSpec] = {}
    with CheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes) as writer:

        def write(tensors: dict[str, torch.Tensor], done: dict | None = None) -> None:
            """Store the planned modules among `tensors` quantized (RTN unless `done` holds them already),
            the rest in their stored dtype."""
            global_scales = _nvfp4_global_scales(tensors, plan, arch, recipe.nvfp4_alpha)
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
                    quantized, record = _quantize_module(tensor, planned.scheme, planned.requested, torch_device,
                                                         global_scales.get(module), recipe.nvfp4_alpha)
                for part, value in quantized.items():
                    writer.add(f"{module}.{part}", value.cpu())
                records[module] = record

        outside = dict(source.items(by_block.get(None, [])))
        hidden = float_hidden = runner = calib_info = None
        if recipe.method in CALIBRATED_METHODS:
            ids = calibration_windows(source.directory, calibration, calib_windows, calib_seq_len)
            calib_info = {"windows": calib_windows, "seq_len": calib_seq_len, "seed": 0, "damp": gptq.damp,
                          "act_order": gptq.act_order, "clip_search": gptq.clip_search, "static_groups": True,
                          "true_sequential": True}
            runner = BlockRunner(source.config, torch_device)
            hidden = outside[f"{arch.embedding}.weight"].to(device=torch_device, dtype=torch.float32)[ids.to(torch_device)]
            if tune.enabled:
                calib_info["tuning"] = {**tune.describe(), "blocks": []}
                float_hidden = hidden.clone()
        write(outside)
        del outside
        bar = tqdm(range(num_layers), desc=f"quantize ({recipe.method})", unit="block", disable=not progress)
        for index in bar:
            block_tensors = dict(source.items(by_block.get(index, [])))
            done = None
            if runner is not None:
                block_start = time.perf_counter()
                calibrated = _CalibratedBlock(runner, arch, plan, index, block_tensors, recipe.method, gptq, tune)
                targets = None if float_hidden is None else runner.forward(calibrated.block, float_hidden)
                hidden = calibrated.run(hidden, targets)
                if targets is not None:
                    float_hidden = targets
                    calib_info["tuning"]["blocks"].append({"block": index, **calibrated.tuning})
                done = calibrated.results
                if calibrated.awq_ratios:
                    calib_info.setdefault("awq_ratios", {}).update(calibrated.awq_ratios)
                tuned = {}
                if calibrated.tuning:  # the block's held-out error after tuning, relative to GPTQ's
                    t = calibrated.tuning
                    tuned["tuned"] = f"{t['held_out_error_after'] / max(t['held_out_error_before'], 1e-30):.2f}x"
                bar.set_postfix(block_s=f"{time.perf_counter() - block_start:.1f}",
                                peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB", **tuned)
            write(block_tensors, done)
            del block_tensors, done
            release_freed_memory()
            if runner is None:
                bar.set_postfix(peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")

        quant_config = NanoQuantConfig(modules=plan.quantized(), tied_lm_head=plan.tied_lm_head)
        config = dict(source.config)
        config["quantization_config"] = quant_config.to_dict()
        provenance = _provenance(source, recipe, calibration, calib_info)
        if allocation_record is not None:
            provenance["allocation"] = allocation_record
        manifest = build_manifest(records, float_specs, provenance)
        copies = [source.directory / f for f in SIDE_FILES if (source.directory / f).is_file()]
        output = writer.commit({"config.json": config, MANIFEST_NAME: manifest}, copies)
    return QuantizeResult(output, manifest, time.perf_counter() - start, peak_rss_bytes())
