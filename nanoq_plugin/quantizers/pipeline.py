"""The layer-by-layer quantization pipeline: read a source lazily, resolve the plan, quantize one decoder block
at a time with the recipe's method (`methods`), stream the packed tensors to a temp dir, and rename the finished
checkpoint into place.

A method needing calibration sees its block through the walk (`_BlockWalk`): the block runs on the quantized
model's hidden states, and each group of linears sharing an input goes to the method with the statistics of
its inputs (accumulated batch by batch, the inputs never held) before the block uses them. A method needing
none gets the same groups from the stored weights. Either way the writer stores what the method returned; the
tables (embedding, LM head), which no walk reaches, are rounded to nearest.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..errors import NanoqError
from ..format.checkpoint import SIDE_FILES, CheckpointWriter, SourceCheckpoint, make_staging_dir
from ..format.layout import TensorSpec
from ..format.manifest import MANIFEST_NAME, ModuleRecord, build_manifest
from ..format.quant_config import NanoQuantConfig
from ..format.reference import dequantize
from ..format.schemes import Scheme
from .allocator import AllocationRequest, allocate_plan
from .architectures import Architecture, open_float_source
from .block_runner import BlockRunner, resolve_device, states_dtype_for
from .block_tuning import TUNABLE_KINDS, TunableLinear, norm_weights, tune_block
from .calibration import SELF, calibration_windows
from .gptq import flush_denormals
from .input_statistics import InputStatistics
from ..memory import peak_rss_bytes, release_freed_memory
from .methods import LinearGroup, QuantMethod, calibrated_method_names, get_method, method_names
from .model_tuning import tune_checkpoint
from .provenance import provenance
from .recipe import Plan, PlannedModule, Recipe, resolve_plan
from .records import module_record
from .settings import GptqSettings, ModelTuneSettings, TuneSettings

# the method that quantizes what no walk reaches (the embedding and LM head tables)
TABLES_METHOD = "rtn"

Quantized = dict[str, tuple[dict[str, torch.Tensor], ModuleRecord]]  # module -> (stored tensors, manifest record)


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint` made: the output folder, its manifest, timing (the whole run, and each decoder
    block's quantization from reading its tensors to writing them) and peak memory."""

    output: Path
    manifest: dict
    seconds: float
    peak_rss_bytes: int
    block_seconds: list[float] = field(default_factory=list)


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


def _moe_record(arch: Architecture, plan: Plan, num_layers: int) -> dict[int, dict]:
    """The manifest's `moe` section before calibration: per MoE block its experts, top_k and scheme per role."""
    if arch.experts is None:
        return {}
    record = {}
    for index in range(num_layers):
        schemes = {role: (plan.modules[modules[0]].scheme.name if modules[0] in plan.modules else "float")
                   for role, modules in arch.expert_modules(index).items()}
        record[index] = {"num_experts": arch.experts.num_experts, "top_k": arch.experts.top_k, "schemes": schemes}
    return record


def _fused_groups(modules: list[str], arch: Architecture) -> list[tuple[str, ...]]:
    """`modules` grouped as engines fuse them (a block's q/k/v, gate/up, in that order), every other module alone."""
    present = set(modules)
    groups: dict[str, tuple[str, ...]] = {}
    for module in modules:
        stem, _, name = module.rpartition(".")
        parent, _, owner = stem.rpartition(".")
        fused = next((group for group in arch.fused_groups if f"{owner}.{name}" in group), None)
        if fused is None:
            groups[module] = (module,)
        else:
            parts = tuple(f"{parent}.{part}" for part in fused if f"{parent}.{part}" in present)
            groups.setdefault(parts[0], parts)
    return list(groups.values())


def _quantize_from_weights(method: QuantMethod, tensors: dict[str, torch.Tensor], plan: Plan, arch: Architecture,
                           device: torch.device, gptq: GptqSettings, nvfp4_alpha: float) -> Quantized:
    """The planned quantized modules among `tensors`, quantized by `method` from their stored weights alone (one
    fused group or one module at a time)."""
    planned = {}
    for name in tensors:
        module = name.removesuffix(".weight")
        entry = plan.modules.get(module) if name.endswith(".weight") else None
        if entry is not None and entry.scheme.is_quantized:
            planned[module] = entry
    done: Quantized = {}
    for modules in _fused_groups(list(planned), arch):
        # as stored: the data-free quantizers compute in float32 a few rows at a time, and a float32 copy of an 8B
        # embedding table is 2.1 GB
        weights = {m: tensors[f"{m}.weight"].to(device=device) for m in modules}
        group = LinearGroup(modules, {m: planned[m] for m in modules}, weights, gptq=gptq, nvfp4_alpha=nvfp4_alpha)
        result = method.quantize_group(group)
        if result.input_scale is not None:
            raise NanoqError(f"method {method.name}: {modules[0]} has no producer to take an input scale")
        for m in modules:
            stored = result.stored[m]
            done[m] = (stored, module_record(result.references.get(m, weights[m]), tensors[f"{m}.weight"].dtype,
                                             stored, planned[m].scheme, planned[m].requested))
    return done


class _BlockWalk:
    """Quantizes the planned linears of one decoder block with a calibrated method while the block runner
    walks it (true sequential), then optionally tunes the quantized block to the float model's outputs."""

    def __init__(self, runner: BlockRunner, arch: Architecture, plan: Plan, index: int,
                 tensors: dict[str, torch.Tensor], method: QuantMethod, settings: GptqSettings,
                 nvfp4_alpha: float = 1.0, tune: TuneSettings = TuneSettings()) -> None:
        self.runner, self.plan, self.tensors, self.method = runner, plan, tensors, method
        self.settings, self.nvfp4_alpha, self.tune = settings, nvfp4_alpha, tune
        self.arch, self.prefix = arch, f"{arch.block_prefix}.{index}"
        # read again after a linear is held only by a later fold of an input scale into it, or by tuning; else
        # each would keep its float32 source weight beside the dequantization the block runs on (0.9 GB at 8B)
        self.keeps_references = method.folds_scales or tune.enabled
        # where no float weight is changed or read again, the block's linears are held as stored (16-bit) and
        # their results as their dequantization rounded to that dtype — what a W4A16 GPU kernel multiplies with;
        # folding scales and tuning change float weights, which rounding would disturb
        self.block = runner.build(index, tensors, arch.block_prefix, stored_linears=not self.keeps_references)
        self.results: Quantized = {}
        self.references: dict[str, torch.Tensor] = {}  # module -> the float weight its stored tensors encode
        self.notes: dict[str, dict[str, float]] = {}  # the method's notes for the calibration provenance
        self.tuning: dict | None = None
        self.index = index
        self.routing: dict = {}  # a mixture-of-experts block: routed tokens per expert, the experts floored

    def run(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output `[B, L, H]` with its quantized weights; `results` holds the stored tensors.
        With `targets [B, L, H]` (the float model's block outputs) and tuning on, the quantized block's
        scales, levels and norms are then fitted to them (quantizers.block_tuning)."""
        tuning = targets is not None and self.tune.enabled  # tuning reads the block's inputs after the walk
        with flush_denormals():
            output = self.runner.walk(self.block, hidden, self.visit, self.visit_experts,
                                      out=None if tuning else hidden)
            if not tuning:
                return output
            self._tune(hidden, targets)
            return self.runner.forward(self.block, hidden) if self.tuning["kept"] else output

    def visit(self, group: tuple[str, ...], statistics: InputStatistics) -> None:
        """Hand `group`'s planned linears and the statistics of their inputs to the method and hold what it
        returns (a scale it asks for is folded into the inputs' producer)."""
        planned = self._planned(group)
        if not planned:
            return
        producer = self.arch.group_of(group).producer
        linears = LinearGroup(
            modules=tuple(self._saved(name) for name in group),
            planned={self._saved(name): entry for name, entry in planned.items()},
            weights={self._saved(name): self.block.get_submodule(name).weight.data for name in group},
            statistics=statistics, producer=None if producer is None else self._saved(producer),
            gptq=self.settings, nvfp4_alpha=self.nvfp4_alpha)
        release_freed_memory()  # the forwards' freed heap, before the group's largest allocations (its Hessian's)
        result = self.method.quantize_group(linears)
        for section, values in result.notes.items():
            self.notes.setdefault(section, {}).update(values)
        if result.input_scale is not None:
            if not self.method.folds_scales:
                raise NanoqError(f"method {self.method.name} returned an input scale for {linears.modules[0]} but "
                                 "does not declare folds_scales")
            self._scale_inputs(group, planned, result.input_scale)
        for name, entry in planned.items():
            module = self._saved(name)
            self.references[module] = result.references.get(module, linears.weights[module])
            self._hold(name, result.stored[module], entry.scheme, entry.requested, self.tensors[f"{module}.weight"].dtype)
            if not self.keeps_references:
                del self.references[module]

    def visit_experts(self, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        """Quantize every expert of the block from the tokens the model's router sent it: `x [T, H]` float32 is
        the experts' input, `top_k_index [T, k]` each token's experts. Expert by expert, its rows of `x` are
        indexed out (one expert's tokens held at a time, never E copies), its gate and up projections are
        quantized on them as one group, then its down projection on `act(gate(x)) * up(x)` computed with the
        quantized gate and up (true sequential). An expert routed fewer than `moe_floor_tokens` tokens is
        calibrated on all tokens, as if routed (the floor); `routing` records the counts and the floored."""
        moe = self.arch.experts
        experts = self.block.get_submodule(moe.experts)
        roles = moe.modules[self.index].roles
        if len(roles) != 2 or any(role.transposed for role in roles) or len(roles[1].parts[0]) != 1:
            raise NanoqError(f"method {self.method.name}: {moe.modules[self.index].class_name}'s experts are not "
                             "gate/up then down projections of [out, in] weights: only rtn quantizes them")
        gate_up, down = roles
        counts = torch.bincount(top_k_index.reshape(-1), minlength=moe.num_experts)[:moe.num_experts].tolist()
        floor = self.settings.moe_floor_tokens
        floored = [e for e, n in enumerate(counts) if n < floor]
        for expert in range(moe.num_experts):
            if expert in floored:
                tokens = x
            else:
                tokens = x.index_select(0, (top_k_index == expert).any(dim=-1).nonzero().squeeze(1))
            self._quantize_expert_role(experts, gate_up, expert, tokens)
            fused = getattr(experts, gate_up.param)[expert]
            gate, up = torch.nn.functional.linear(tokens, fused).chunk(2, dim=-1)  # as the experts' forward does
            hidden = experts.act_fn(gate) * up
            del gate, up
            self._quantize_expert_role(experts, down, expert, hidden)
            del tokens, hidden
        self.routing = {"routed_tokens": counts, "floor": floored, "floor_tokens": floor}

    def _quantize_expert_role(self, experts: nn.Module, role, expert: int, inputs: torch.Tensor) -> None:
        """Hand expert `expert`'s parts of `role` (its gate and up, or its down) with `inputs [n, K]` to the
        method as one group; hold the stored tensors and put their dequantization into the fused parameter."""
        fused = getattr(experts, role.param)
        parts = role.parts[expert]
        modules = tuple(part.module for part in parts)
        planned = {m: self.plan.modules[m] for m in modules
                   if m in self.plan.modules and self.plan.modules[m].scheme.is_quantized}
        if not planned:
            return
        weights = {part.module: fused.data[expert, part.rows.start:part.rows.stop] for part in parts}
        group = LinearGroup(modules=modules, planned=planned, weights=weights,
                            statistics=InputStatistics.of(inputs), producer=None, gptq=self.settings,
                            nvfp4_alpha=self.nvfp4_alpha)
        result = self.method.quantize_group(group)
        if result.input_scale is not None:
            raise NanoqError(f"method {self.method.name}: {modules[0]} has no producer to take an input scale")
        for part in parts:
            if part.module not in planned:
                continue
            entry = planned[part.module]
            stored = result.stored[part.module]
            reference = result.references.get(part.module, weights[part.module])
            restored = dequantize(stored, entry.scheme, *reference.shape).to(fused.device)
            self.results[part.module] = (stored, module_record(reference, self.tensors[f"{part.module}.weight"].dtype,
                                                               stored, entry.scheme, entry.requested, restored))
            fused.data[expert, part.rows.start:part.rows.stop] = restored
            self._release_stored_weight(part.module)

    def _scale_inputs(self, group: tuple[str, ...], planned: dict[str, PlannedModule], scale: torch.Tensor) -> None:
        """Divide `group`'s inputs by `scale [K]`: fold it into their producer and multiply the group's float
        linears by it (the walk computes every later input afresh from the block as changed)."""
        entry = self.arch.group_of(group)
        if entry.producer is None:
            raise NanoqError(f"method {self.method.name}: {self.prefix}.{group[0]}'s input has no producer to take a scale")
        producer = entry.producer
        self._fold_into_producer(producer, scale, entry.norm_offset)
        for name in group:
            if name not in planned:
                linear = self.block.get_submodule(name)
                linear.weight.data = linear.weight.data * scale
                self._store_float(f"{name}.weight")

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
            record = self.results[self._saved(name)][1]
            self._hold(name, tunable.stored(), record.scheme, record.requested_scheme, record.source_dtype)
        for name in norm_weights(self.block):
            self._store_float(name)

    def _hold(self, name: str, stored: dict[str, torch.Tensor], scheme: Scheme, requested: Scheme,
              source_dtype: torch.dtype) -> None:
        """Take `stored` as linear `name`'s result (recorded against its float reference in `references`)
        and run the block on its dequantization from here on."""
        module = self._saved(name)
        linear = self.block.get_submodule(name)
        restored = dequantize(stored, scheme, *linear.weight.shape).to(linear.weight.device)
        self.results[module] = (stored, module_record(self.references[module], source_dtype, stored, scheme,
                                                      requested, restored))
        linear.weight.data = restored.to(linear.weight.dtype)
        self._release_stored_weight(module)

    def _release_stored_weight(self, module: str) -> None:
        """Keep only the shape and dtype of quantized `module`'s stored weight: the block runs on its own float32
        copy, and the writer stores the results instead (an 8B block's linears are 436 MB in bf16)."""
        self.tensors[f"{module}.weight"] = self.tensors[f"{module}.weight"].to("meta")

    def _saved(self, name: str) -> str:
        """The full saved name of block module or tensor `name` (relative, in-memory): where transformers saves it
        under another name (an MoE block's renamed modules) the plan, the tensors and the results use that one."""
        return f"{self.prefix}.{self.arch.saved(name)}"

    def _planned(self, group: tuple[str, ...]) -> dict[str, PlannedModule]:
        entries = {name: self.plan.modules.get(self._saved(name)) for name in group}
        return {name: e for name, e in entries.items() if e is not None and e.scheme.is_quantized}

    def _store_float(self, name: str) -> None:
        """Write a float parameter (a scaled weight or bias) back to the tensors the block is saved from."""
        key = self._saved(name)
        self.tensors[key] = self.block.get_parameter(name).data.to(self.tensors[key].dtype)

    def _fold_into_producer(self, producer: str, scale: torch.Tensor, norm_offset: float = 0.0) -> None:
        """Divide the output channels of `producer` by `scale [K]`: a linear's rows, or a norm's gain — `w` or,
        for a norm computing `(1 + w) x̂` (`norm_offset` 1), `1 + w` — and its bias if it has one."""
        module = self.block.get_submodule(producer)
        key = self._saved(producer)
        if key in self.results:  # a quantized linear: its per-output-channel scales absorb the division
            stored, record = self.results[key]
            stored["scales"] = (stored["scales"].to(torch.float32) / scale).to(stored["scales"].dtype)
            self.references[key] = self.references[key] / scale.unsqueeze(1)
            self._hold(producer, stored, record.scheme, record.requested_scheme, record.source_dtype)
            return
        weight = module.weight.data
        if weight.dim() == 1:
            module.weight.data = (weight + norm_offset) / scale - norm_offset
        else:
            module.weight.data = weight / scale.unsqueeze(1)
        self._store_float(f"{producer}.weight")
        module.weight.data = self.tensors[f"{key}.weight"].to(torch.float32).to(weight.device)  # as stored
        bias = getattr(module, "bias", None)
        if bias is not None:
            module.bias.data = bias.data / scale
            self._store_float(f"{producer}.bias")
            module.bias.data = self.tensors[f"{key}.bias"].to(torch.float32).to(weight.device)


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
    method = get_method(recipe.method)
    if e2e.enabled:
        if calibration is None:
            raise NanoqError("--e2e-steps tunes against the float model on calibration text: pass --calib FILE")
        if method.folds_scales:
            keeping = [name for name in method_names() if not get_method(name).folds_scales]
            raise NanoqError(f"--e2e-steps: method {recipe.method} folds scales into the float weights; "
                             f"use {' or '.join(keeping)}")
        if open_float_source(source_dir, instead="quantize from a float checkpoint")[1].experts is not None:
            raise NanoqError("mixture-of-experts models: --e2e-steps does not handle experts yet")
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
    if tune.enabled and not method.needs_calibration:
        raise NanoqError(f"--tune-steps fits a calibrated block to the float model: method {recipe.method} is not "
                         f"calibrated (use one of {', '.join(calibrated_method_names())})")
    if method.needs_calibration and calibration is None:
        raise NanoqError(f"method {recipe.method} needs calibration text: pass --calib FILE (e.g. WikiText-2 train)")
    tables = {m: tuple(source.shape(f"{m}.weight")) for m in (arch.embedding, arch.lm_head) if f"{m}.weight" in source}
    tied = bool(source.config.get("tie_word_embeddings", False))
    if allocation is not None and calibration is None:
        raise NanoqError("the allocator measures sensitivity on calibration text: pass --calib FILE")
    if arch.experts is not None and tune.enabled:
        raise NanoqError("mixture-of-experts models: --tune-steps does not handle experts yet (quantize with rtn, "
                         "gptq or awq)")
    shapes = _block_linear_shapes(source, arch, num_layers)
    plan: Plan = resolve_plan(recipe, arch, shapes, tables, tied)
    moe = _moe_record(arch, plan, num_layers)

    by_block: dict[int | None, list[str]] = {}
    for name in source.keys():
        by_block.setdefault(arch.block_of(name), []).append(name)
    unknown_blocks = sorted(b for b in by_block if b is not None and b >= num_layers)
    if unknown_blocks:
        raise NanoqError(f"{source.directory}: tensors for block {unknown_blocks[0]} but num_hidden_layers is {num_layers}")

    allocation_record = None
    if allocation is not None:
        allocation_record = allocate_plan(source, arch, plan, allocation, recipe, shapes, num_layers, by_block,
                                          calibration, calib_seq_len, torch_device, progress, gptq.moe_floor_tokens)
        moe = _moe_record(arch, plan, num_layers)  # the allocated schemes

    records: dict[str, ModuleRecord] = {}
    float_specs: dict[str, TensorSpec] = {}
    with CheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes) as writer:

        def write(tensors: dict[str, torch.Tensor], done: Quantized) -> None:
            """Store the planned modules among `tensors` quantized (as `done` holds them; any other by round to
            nearest), the rest in their stored dtype."""
            rest = {name: t for name, t in tensors.items() if name.removesuffix(".weight") not in done}
            done = {**done, **_quantize_from_weights(get_method(TABLES_METHOD), rest, plan, arch, torch_device, gptq,
                                                     recipe.nvfp4_alpha)}
            for name, tensor in tensors.items():
                if plan.tied_lm_head is not None and name == f"{arch.lm_head}.weight":
                    continue  # the head is the quantized embedding table
                module = name.removesuffix(".weight")
                if not name.endswith(".weight") or module not in done:
                    writer.add(name, tensor)
                    float_specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
                    continue
                quantized, record = done[module]
                for part, value in quantized.items():
                    writer.add(f"{module}.{part}", value.cpu())
                records[module] = record

        def write_data_free(names: list[str]) -> None:
            """Quantize and store `names` (one block's tensors) with the method from the weights alone, loading
            one fused group (or one other tensor) at a time: an 8B block is 436 MB in bf16, twice that as the
            float32 working copies, and holding it whole beside a filling output shard was the run's peak."""
            planned = [n.removesuffix(".weight") for n in names if n.endswith(".weight")
                       and (entry := plan.modules.get(n.removesuffix(".weight"))) is not None
                       and entry.scheme.is_quantized]
            written = set()
            for modules in _fused_groups(planned, arch):
                tensors = {f"{m}.weight": source.get(f"{m}.weight") for m in modules}
                write(tensors, _quantize_from_weights(method, tensors, plan, arch, torch_device, gptq,
                                                      recipe.nvfp4_alpha))
                written.update(tensors)
                del tensors
                release_freed_memory()
            for name in names:
                if name not in written:
                    write({name: source.get(name)}, {})

        hidden = float_hidden = runner = calib_info = None
        if method.needs_calibration:
            ids = calibration_windows(source.directory, calibration, calib_windows, calib_seq_len)
            calib_info = {"windows": calib_windows, "seq_len": calib_seq_len, "seed": 0, "damp": gptq.damp,
                          "act_order": gptq.act_order, "clip_search": gptq.clip_search, "static_groups": True,
                          "true_sequential": True}
            runner = BlockRunner(source.config, torch_device, arch=arch,
                                 states_dtype=states_dtype_for(source.dtype(f"{arch.embedding}.weight")))
        # one tensor at a time: at 8B the embedding and the untied head are 1 GB each, and holding both at once
        # was the run's peak; and before the calibration states exist (1 GB at 8B), which rounding the head beside
        # would hold as well
        for name in by_block.get(None, []):
            write({name: source.get(name)}, {})
            release_freed_memory()
        if runner is not None:
            hidden = runner.embed(ids, source.get(f"{arch.embedding}.weight"))
            if tune.enabled:
                calib_info["tuning"] = {**tune.describe(), "blocks": []}
                float_hidden = hidden.clone()
        bar = tqdm(range(num_layers), desc=f"quantize ({recipe.method})", unit="block", disable=not progress)
        block_seconds = []
        for index in bar:
            block_start = time.perf_counter()
            if runner is None:  # from the weights alone: one fused group in memory at a time, not the block
                write_data_free(by_block.get(index, []))
                block_seconds.append(time.perf_counter() - block_start)
                bar.set_postfix(peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")
                continue
            block_tensors = dict(source.items(by_block.get(index, [])))
            walk = _BlockWalk(runner, arch, plan, index, block_tensors, method, gptq, recipe.nvfp4_alpha, tune)
            targets = None if float_hidden is None else runner.forward(walk.block, float_hidden)
            hidden = walk.run(hidden, targets)
            if targets is not None:
                float_hidden = targets
                calib_info["tuning"]["blocks"].append({"block": index, **walk.tuning})
            done = walk.results
            if walk.routing:
                moe[index].update(walk.routing)
            for section, values in walk.notes.items():
                calib_info.setdefault(section, {}).update(values)
            tuned = {}
            if walk.tuning:  # the block's held-out error after tuning, relative to the method's
                t = walk.tuning
                tuned["tuned"] = f"{t['held_out_error_after'] / max(t['held_out_error_before'], 1e-30):.2f}x"
            bar.set_postfix(block_s=f"{time.perf_counter() - block_start:.1f}",
                            peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB", **tuned)
            write(block_tensors, done)
            del block_tensors, done
            release_freed_memory()
            block_seconds.append(time.perf_counter() - block_start)

        quant_config = NanoQuantConfig(modules=plan.quantized(), tied_lm_head=plan.tied_lm_head)
        config = dict(source.config)
        config["quantization_config"] = quant_config.to_dict()
        record = provenance(source, recipe, calibration, calib_info)
        if allocation_record is not None:
            record["allocation"] = allocation_record
        manifest = build_manifest(records, float_specs, record, moe)
        copies = [source.directory / f for f in SIDE_FILES if (source.directory / f).is_file()]
        output = writer.commit({"config.json": config, MANIFEST_NAME: manifest}, copies)
    return QuantizeResult(output, manifest, time.perf_counter() - start, peak_rss_bytes(), block_seconds)
