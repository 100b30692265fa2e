"""Mixture-of-experts modules: how transformers holds their experts in memory and how a checkpoint stores them.

transformers 5 keeps the experts of one MoE block in one module (`Qwen3MoeExperts`, `MixtralExperts`, ...)
with fused 3-D parameters, e.g. `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (`[E, out, in]`, or
`[E, in, out]` where the class says `is_transposed`), while `save_pretrained` writes the hub's per-expert
layout through the family's conversion mapping (`mlp.experts.{e}.gate_proj.weight [I, H]`, Mixtral's
`block_sparse_moe.experts.{e}.w1.weight`, ...). A nano checkpoint stores every expert projection under that
per-expert name, as a linear of the format (`<module>.qweight`, ... or `<module>.weight`).

Nothing here is written per family: an experts module is a module with 3-D parameters, and which per-expert
tensor fills which rows of which fused parameter is read from transformers' own conversion mapping, by running
its save-direction conversion on a small probe (one input column per parameter whose values number the rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NanoqError


@dataclass(frozen=True)
class ExpertPart:
    """One stored per-expert linear: checkpoint module `module` (weight `[len(rows), in]`) fills rows `rows` of
    expert `expert` of a fused parameter; `local` is where transformers' loader puts its tensors, relative to
    the in-memory experts module (e.g. `3.w1`)."""

    module: str
    expert: int
    rows: range
    local: str


@dataclass(frozen=True)
class ExpertRole:
    """One fused parameter of an experts module (`gate_up_proj`, `down_proj`, ...): `[E, out, in]` in memory
    (`[E, in, out]` when `transposed`), and per expert the stored modules that fill it, in row order."""

    param: str
    shape: tuple[int, int, int]
    transposed: bool
    parts: tuple[tuple[ExpertPart, ...], ...]

    @property
    def out_features(self) -> int:
        return self.shape[1] if not self.transposed else self.shape[2]

    @property
    def in_features(self) -> int:
        return self.shape[2] if not self.transposed else self.shape[1]

    def modules(self) -> list[str]:
        """Every stored module of this role, expert by expert."""
        return [part.module for parts in self.parts for part in parts]


@dataclass(frozen=True)
class ExpertsModule:
    """An in-memory experts module `name` (class `class_name`) of `num_experts` experts whose fused
    parameters are stored per expert (`roles`), with the checkpoint name of its MoE block (`block`)."""

    name: str
    class_name: str
    num_experts: int
    roles: tuple[ExpertRole, ...]
    block: str

    def modules(self) -> list[str]:
        return [module for role in self.roles for module in role.modules()]


def _fused_params(module) -> dict[str, torch.Tensor]:
    """The 3-D parameters `module` holds itself (an experts module's fused `[E, ...]` weights)."""
    return {name: param for name, param in module.named_parameters(recurse=False) if param.dim() == 3}


def find_experts_modules(model) -> list[ExpertsModule]:
    """The experts modules of the transformers model `model` (any device, meta included) whose fused parameters
    transformers' save conversion splits per expert. Experts that a family's checkpoints keep fused are not
    listed (they are stored as their in-memory parameters)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key, revert_weight_conversion

    renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    found = []
    for name, module in model.named_modules():
        params = _fused_params(module)
        if not params:
            continue
        kind = type(module).__name__
        transposed = bool(getattr(module, "is_transposed", False))
        roles = []
        for param_name, param in params.items():
            shape = tuple(int(d) for d in param.shape)
            experts, rows = shape[0], shape[2] if transposed else shape[1]
            # the probe: one input column whose values number (expert, row), through the save conversion
            codes = torch.arange(experts * rows, dtype=torch.float64, device="cpu").reshape(experts, rows)
            key = f"{name}.{param_name}"
            stored = revert_weight_conversion(model, {key: codes.unsqueeze(1) if transposed else codes.unsqueeze(2)})
            if key in stored:
                break  # stored fused, as in memory
            per_expert: list[list[ExpertPart]] = [[] for _ in range(experts)]
            for stored_key, value in stored.items():
                flat = value.reshape(-1).long()
                expert = int(flat[0]) // rows
                if not stored_key.endswith(".weight") or not bool((flat // rows == expert).all()):
                    raise NanoqError(f"{kind} '{name}': transformers' conversion stores {param_name} as "
                                     f"'{stored_key}', not as one linear weight per expert")
                got = (flat - expert * rows).tolist()
                step = got[1] - got[0] if len(got) > 1 else 1
                span = range(got[0], got[0] + step * len(got), step)
                if step <= 0 or list(span) != got:
                    raise NanoqError(f"{kind} '{name}': '{stored_key}' fills rows of {param_name} that are not "
                                     "evenly spaced")
                module_name = stored_key.removesuffix(".weight")
                # where the loader puts this module's tensors: transformers' own renamings of a non-weight key
                loaded, _ = rename_source_key(f"{module_name}.nano", renamings, [])
                if not loaded.startswith(f"{name}."):
                    raise NanoqError(f"{kind} '{name}': its stored expert '{module_name}' does not load under it "
                                     f"(transformers renames it to '{loaded}')")
                per_expert[expert].append(ExpertPart(module_name, expert, span,
                                                     loaded.removeprefix(f"{name}.").removesuffix(".nano")))
            for expert, parts in enumerate(per_expert):
                parts.sort(key=lambda part: part.rows.start)
                if sorted(row for part in parts for row in part.rows) != list(range(rows)):
                    raise NanoqError(f"{kind} '{name}': transformers' conversion does not store every row of "
                                     f"expert {expert}'s {param_name} exactly once")
            roles.append(ExpertRole(param_name, shape, transposed, tuple(tuple(parts) for parts in per_expert)))
        else:
            first = roles[0].parts[0][0]
            # the stored MoE block: the stored module name up to the part's local path (`3.w1`), less one level
            block = first.module.removesuffix("." + first.local).rpartition(".")[0]
            found.append(ExpertsModule(name, kind, roles[0].shape[0], tuple(roles), block))
    return found
