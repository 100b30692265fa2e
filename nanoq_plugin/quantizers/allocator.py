"""Mixed-precision allocation: measure how much each block linear suffers under each candidate scheme, then
choose one scheme per unit (a linear, or a fused q/k/v / gate/up group, which engines need in one scheme)
to meet a size budget with the least predicted loss.

Sensitivity of a linear `W [N, K]` to a scheme: its expected loss change, estimated as the Hessian-weighted
output error `tr(ΔW H ΔWᵀ)` of nearest rounding `ΔW = W - Q(W)` (`H` the mean `2 xᵀx` of the linear's
calibration inputs in the float model: the squared error the rounding adds to the residual stream, averaged
over tokens) times `f_l`, the mean squared gradient of the loss at the output of the linear's block
(loss_weights.residual_fisher: the Fisher information of the residual stream, taken isotropic). Without that
weight, output errors of different blocks are not comparable: SmolLM2's residual stream grows ~300x in mean
square over its 30 blocks, and absolute errors sent every 2-bit choice to the first blocks, whose damage
then propagated through all the others. The unit's cost is the sum over its linears.

Mixture-of-experts blocks: all experts' projections of one role (gate and up; down) are one unit (engines hold
one scheme per role per block). An expert's error is measured on the tokens the float model's router sends it
(the calibration floor applies: too few, and all tokens stand in for them) and weighed by the fraction of
tokens it serves, so that it is comparable with a dense linear's error averaged over every token.

Choice: a multiple-choice knapsack solved greedily on the convex hull — start every unit at its smallest
candidate, then repeatedly take the upgrade with the largest error reduction per extra byte until the next
one would overshoot the budget. The manifest records every unit's candidates, errors, bytes and choice.

`allocate_plan` is the pipeline's entry: the sensitivity pass over the float model, then the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..errors import NanoqError
from ..format.checkpoint import SourceCheckpoint
from ..format.layout import TensorSpec, param_specs, stored_bytes
from ..format.schemes import Scheme, SchemeKind, parse_scheme
from .architectures import Architecture
from .awq import output_error
from .block_runner import BlockRunner
from .calibration import calibration_windows
from .codebook import fake_quantize_codebook
from .input_statistics import InputStatistics
from .loss_weights import head_loss_gradient, residual_fisher
from ..memory import release_freed_memory
from .recipe import Plan, PlannedModule, Recipe, fit_group_size
from .rtn import fake_quantize_rtn

DEFAULT_CANDIDATES = ("int2g64", "int3g128", "int4g128", "int8")


@dataclass
class Unit:
    """Modules that get one scheme together, with each candidate's error and stored bytes."""

    modules: tuple[str, ...]
    params: int
    schemes: dict[str, dict[str, Scheme]] = field(default_factory=dict)  # candidate -> module -> fitted scheme
    errors: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


def parse_candidates(text: str) -> tuple[Scheme, ...]:
    """`int3g128,int4g128,int8` -> schemes (quantized ones only), NanoqError on a bad name."""
    schemes = tuple(parse_scheme(part) for part in text.split(",") if part.strip())
    if len(schemes) < 2 or any(not s.is_quantized or s.kind is SchemeKind.NVFP4 for s in schemes):
        raise NanoqError(f"--candidates {text!r}: give at least two integer or codebook schemes, comma-separated")
    return schemes


ESTIMATE_LLOYD_ITERATIONS = 3  # codebook levels for the estimate: close to the fit, 10x cheaper


def restored_nearest(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`weight [N, K]` after nearest rounding in `scheme` (float32): the error the allocator predicts."""
    if scheme.kind is SchemeKind.CODEBOOK:
        return fake_quantize_codebook(weight, scheme, ESTIMATE_LLOYD_ITERATIONS)
    return fake_quantize_rtn(weight, scheme)


def build_units(plan: Plan, arch: Architecture, num_layers: int, shapes: dict[str, tuple[int, int]],
                candidates: tuple[Scheme, ...], recipe_name: str) -> list[Unit]:
    """One unit per fused group or single linear among the plan's quantized block linears."""
    units = []
    for index in range(num_layers):
        stem = f"{arch.block_prefix}.{index}."
        remaining = [m for m in arch.linears_of_block(index) if m in plan.modules and plan.modules[m].scheme.is_quantized]
        for modules in arch.expert_modules(index).values():  # one unit per expert role
            members = tuple(m for m in modules if m in remaining)
            if members:
                units.append(Unit(members, 0))
                remaining = [m for m in remaining if m not in set(members)]
        for group in arch.fused_groups:
            members = tuple(stem + part for part in group if stem + part in remaining)
            if members:
                units.append(Unit(members, 0))
                remaining = [m for m in remaining if m not in members]
        units.extend(Unit((m,), 0) for m in remaining)
    for unit in units:
        unit.params = sum(shapes[m][0] * shapes[m][1] for m in unit.modules)
        for candidate in candidates:
            fitted = {m: fit_group_size(candidate, True, recipe_name, m, *shapes[m]) for m in unit.modules}
            unit.schemes[candidate.name] = fitted
            unit.bytes[candidate.name] = sum(stored_bytes(param_specs(fitted[m], *shapes[m])) for m in unit.modules)
    return units


def measure_group(units_by_module: dict[str, Unit], block: torch.nn.Module, prefix: str, group: tuple[str, ...],
                  statistics: InputStatistics) -> None:
    """Add the errors of every candidate to the units of `group`'s linears, from the statistics of their inputs."""
    members = {f"{prefix}.{name}": name for name in group if f"{prefix}.{name}" in units_by_module}
    if not members:
        return
    h = statistics.hessian
    for module, name in members.items():
        unit = units_by_module[module]
        weight = block.get_submodule(name).weight.data.to(torch.float32)
        for candidate, fitted in unit.schemes.items():
            restored = restored_nearest(weight, fitted[module])
            unit.errors[candidate] = unit.errors.get(candidate, 0.0) + output_error(weight, restored, h)


def measure_experts(units_by_module: dict[str, Unit], block: torch.nn.Module, arch: Architecture, index: int,
                    x: torch.Tensor, top_k_index: torch.Tensor, floor_tokens: int) -> None:
    """Add the errors of every candidate to the expert-role units of block `index`, expert by expert, from the
    experts' input `x [T, H]` and the router's choice `top_k_index [T, k]` (module docstring)."""
    moe = arch.experts
    experts = block.get_submodule(moe.experts)
    roles = moe.modules[index].roles
    counts = torch.bincount(top_k_index.reshape(-1), minlength=moe.num_experts)[:moe.num_experts]
    for expert in range(moe.num_experts):
        if counts[expert] < floor_tokens:
            tokens = x
        else:
            tokens = x.index_select(0, (top_k_index == expert).any(dim=-1).nonzero().squeeze(1))
        share = max(int(counts[expert]), 1) / x.shape[0]  # the fraction of tokens this expert serves
        inputs = tokens
        for position, role in enumerate(roles):
            if position:  # down reads act(gate) * up, as the experts' forward computes it
                gate, up = torch.nn.functional.linear(tokens, getattr(experts, roles[0].param).data[expert]).chunk(2, -1)
                inputs = experts.act_fn(gate) * up
            hessian = InputStatistics.of(inputs).hessian  # once per role, not per part and candidate
            fused = getattr(experts, role.param).data[expert]
            for part in role.parts[expert]:
                unit = units_by_module.get(part.module)
                if unit is None:
                    continue
                weight = fused[part.rows.start:part.rows.stop].to(torch.float32)
                for candidate, fitted in unit.schemes.items():
                    error = output_error(weight, restored_nearest(weight, fitted[part.module]), hessian)
                    unit.errors[candidate] = unit.errors.get(candidate, 0.0) + share * error


def weigh_errors(units: list[Unit], weights: list[float]) -> None:
    """Multiply every candidate's error of `units[i]` by `weights[i]` (the Fisher weight of its block)."""
    for unit, weight in zip(units, weights):
        unit.errors = {candidate: error * weight for candidate, error in unit.errors.items()}


def allocate(units: list[Unit], budget_bytes: float) -> list[str]:
    """The candidate name chosen for each unit (greedy on error reduction per byte, within `budget_bytes`)."""
    choice = []
    for unit in units:
        choice.append(min(unit.bytes, key=lambda c: (unit.bytes[c], unit.errors[c])))
    used = sum(unit.bytes[c] for unit, c in zip(units, choice))
    if used > budget_bytes:
        smallest = used * 8 / max(1, sum(u.params for u in units))
        raise NanoqError(f"the size target is below what the smallest candidate gives ({smallest:.3f} bits per weight)")
    while True:
        best = None
        for position, unit in enumerate(units):
            current = choice[position]
            for candidate in unit.bytes:
                extra = unit.bytes[candidate] - unit.bytes[current]
                gain = unit.errors[current] - unit.errors[candidate]
                if extra <= 0 or gain <= 0 or used + extra > budget_bytes:
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, position, candidate, extra)
        if best is None:
            return choice
        _, position, candidate, extra = best
        choice[position] = candidate
        used += extra


def apply_allocation(plan: Plan, units: list[Unit], choice: list[str]) -> dict:
    """Put the chosen schemes into `plan` (in place); returns the manifest's record of the decisions."""
    decisions = []
    for unit, chosen in zip(units, choice):
        for module in unit.modules:
            fitted = unit.schemes[chosen][module]
            plan.modules[module] = PlannedModule(fitted, fitted)
        decisions.append({"modules": list(unit.modules), "chosen": chosen,
                          "errors": {c: float(f"{e:.6g}") for c, e in unit.errors.items()}, "bytes": unit.bytes})
    quantized_bytes = sum(unit.bytes[c] for unit, c in zip(units, choice))
    params = sum(unit.params for unit in units)
    return {"achieved_bits_per_weight": round(8 * quantized_bytes / params, 4), "units": decisions}


@dataclass(frozen=True)
class AllocationRequest:
    """Mixed precision by measured sensitivity: the candidate schemes and a size target."""

    candidates: tuple[Scheme, ...]
    target_bpw: float | None = None  # bits per weight over the allocated block linears
    target_bytes: int | None = None  # stored bytes of the whole checkpoint
    windows: int = 32  # calibration windows for the sensitivity pass

    def describe(self) -> dict:
        return {"candidates": [c.name for c in self.candidates], "target_bpw": self.target_bpw,
                "target_bytes": self.target_bytes, "sensitivity_windows": self.windows}


FISHER_WINDOWS = 8  # sensitivity windows whose loss gradient weighs the errors (loss_weights)


def allocate_plan(source: SourceCheckpoint, arch: Architecture, plan: Plan, request: AllocationRequest,
                  recipe: Recipe, shapes: dict[str, tuple[int, int]], num_layers: int, by_block: dict,
                  calibration: str, calib_seq_len: int, device: torch.device, progress: bool,
                  floor_tokens: int = 256) -> dict:
    """Measure every unit's sensitivity on the float model, choose schemes into `plan`; returns the record.
    `floor_tokens`: an expert routed fewer tokens is measured on all tokens (the MoE calibration floor)."""
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
    runner = BlockRunner(source.config, device, arch=arch)
    ids = calibration_windows(source.directory, calibration, request.windows, calib_seq_len)
    embedding = dict(source.items([f"{arch.embedding}.weight"]))[f"{arch.embedding}.weight"]
    hidden = runner.embed(ids, embedding)

    def build_block(index: int) -> torch.nn.Module:
        return runner.build(index, dict(source.items(by_block.get(index, []))), arch.block_prefix)

    block_inputs = []  # the first FISHER_WINDOWS windows' input of every block, for the backward pass
    for index in tqdm(range(num_layers), desc="sensitivity", unit="block", disable=not progress):
        block = build_block(index)
        prefix = f"{arch.block_prefix}.{index}"
        block_inputs.append(hidden[:FISHER_WINDOWS].to(torch.bfloat16))
        hidden = runner.walk(block, hidden, lambda group, statistics: measure_group(
            unit_of, block, prefix, group, statistics), lambda x, picks: measure_experts(
            unit_of, block, arch, index, x, picks, floor_tokens), out=hidden)
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
