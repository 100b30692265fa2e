"""Mixture-of-experts blocks for the quantizer: what a block's experts are, and reading them per expert.

transformers 5 holds a block's experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj
[E, H, I]`) and `save_pretrained` writes them per expert (`mlp.experts.{e}.gate_proj.weight [I, H]`; Mixtral
`block_sparse_moe.experts.{e}.w1.weight`); `format.expert_tensors` reads which saved weight fills which rows of
which fused parameter from transformers' own conversion mapping. The quantizer works on the saved, per-expert
names throughout (a nano checkpoint stores every expert projection per expert under that name):

- `MoeAnatomy` is what discovery finds in the blocks: the experts module, its router and top_k, the routing
  gates that stay float, the experts of every block (`ExpertsModule`), and the block tensors other than experts
  saved under another name (Mixtral's `block_sparse_moe.gate.weight` for the in-memory `mlp.gate.weight`).
- `SavedExpertsSource` presents a float source under those saved names whichever layout it stores (per expert,
  or fused 3-D as in memory: each expert's rows are then read as a slice of the stored tensor).
- `memory_state` turns a block's saved tensors back into the state dict of transformers' decoder-layer class
  (fused experts), so the block runs as the model's own code runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NanoqError
from ..format.expert_tensors import ExpertRole, ExpertsModule, find_experts_modules


@dataclass(frozen=True)
class MoeAnatomy:
    """The experts of a mixture-of-experts model's blocks (names relative to a block unless said otherwise).

    `experts`: the in-memory experts module (`mlp.experts`); `router`: the module routing to them (`mlp.gate`,
    weight `[E, H]`); `top_k`: experts per token; `gates`: the router and any other routing linear (a shared
    expert's gate), which stay float unless a rule names them; `modules`: per block (in order) its
    `ExpertsModule` (saved per-expert names, role by role); `renamed`: (in-memory, saved) names of the block's
    other tensors that transformers saves under another name.
    """

    experts: str
    router: str
    num_experts: int
    top_k: int
    gates: tuple[str, ...]
    modules: tuple[ExpertsModule, ...]
    renamed: tuple[tuple[str, str], ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role.param for role in self.modules[0].roles)

    def role_modules(self, index: int) -> dict[str, list[str]]:
        """Role (`gate_up_proj`, `down_proj`) -> block `index`'s saved expert modules of that role (expert by
        expert, parts in row order: `...experts.0.gate_proj`, `...experts.0.up_proj`, `...experts.1.gate_proj`)."""
        return {role.param: role.modules() for role in self.modules[index].roles}

    def saved(self, relative: str) -> str:
        return dict(self.renamed).get(relative, relative)

    def memory(self, relative: str) -> str:
        return {saved: memory for memory, saved in self.renamed}.get(relative, relative)


def discover_experts(model, block_prefix: str, blocks, hf_config, where: str, expert_keys) -> MoeAnatomy | None:
    """The experts of `model`'s blocks (a causal LM on the meta device; `blocks` its decoder-layer ModuleList
    at `block_prefix`), or None for a dense model; NanoqError naming `where` and what was not found for a
    mixture of experts whose experts cannot be read."""
    from torch import nn

    name = type(model).__name__
    counts = [key for key in expert_keys if (getattr(hf_config, key, None) or 0) > 1]
    holders = [sorted({p.rpartition(".")[0] for p, t in block.named_parameters() if t.dim() > 2}) for block in blocks]
    if not holders[0]:
        if counts or any(holders):
            what = f"{counts[0]}={getattr(hf_config, counts[0])}" if counts else "3-D expert parameters"
            raise NanoqError(f"{where}: {name} is a mixture-of-experts model ({what}) but block 0 holds no experts "
                             "module with 3-D parameters [experts, out, in]: its experts cannot be found")
        return None
    if len(holders[0]) != 1:
        raise NanoqError(f"{where}: block 0 of {name} holds 3-D parameters in {len(holders[0])} modules "
                         f"({holders[0][:3]}): one experts module per block is supported")
    experts = holders[0][0]
    for index, found in enumerate(holders):
        if found != holders[0]:
            raise NanoqError(f"{where}: block {index} of {name} has experts {found or 'none'} unlike block 0's "
                             f"{holders[0]}: blocks of different anatomy (dense and MoE mixed) are not supported")
    try:
        found = {module.name: module for module in find_experts_modules(model)}
    except NanoqError as err:
        raise NanoqError(f"{where}: {err}") from None
    modules = []
    for index in range(len(blocks)):
        module = found.get(f"{block_prefix}.{index}.{experts}")
        if module is None:
            raise NanoqError(f"{where}: transformers saves {name}'s experts '{experts}' fused (as in memory), not "
                             "one weight per expert: not supported")
        modules.append(module)
    num_experts = modules[0].num_experts
    parent = experts.rpartition(".")[0]
    siblings = blocks[0].get_submodule(parent) if parent else blocks[0]
    hidden = hf_config.hidden_size
    routers = [child for child, m in siblings.named_children()
               if tuple(getattr(getattr(m, "weight", None), "shape", ())) == (num_experts, hidden)]
    if len(routers) != 1:
        raise NanoqError(f"{where}: found {len(routers)} routers (a module with weight [{num_experts}, {hidden}]) "
                         f"beside {name}'s experts '{experts}': its routing cannot be discovered")
    router = f"{parent}.{routers[0]}" if parent else routers[0]
    top_k = getattr(siblings.get_submodule(routers[0]), "top_k", None) or getattr(hf_config, "num_experts_per_tok",
                                                                                 None)
    if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
        raise NanoqError(f"{where}: {name}'s router '{router}' has no top_k (nor the config num_experts_per_tok): "
                         "how many experts a token goes to cannot be discovered")
    gates = [router] + [f"{parent}.{child}" if parent else child for child, m in siblings.named_children()
                        if isinstance(m, nn.Linear) and m.out_features in (1, num_experts)]
    return MoeAnatomy(experts, router, int(num_experts), int(top_k), tuple(dict.fromkeys(gates)), tuple(modules),
                      _renamed(model, block_prefix, experts))


def _renamed(model, block_prefix: str, experts: str) -> tuple[tuple[str, str], ...]:
    """(in-memory, saved) names relative to the block of block 0's non-expert tensors that transformers' save
    conversion renames: each tensor is labelled with its own number (a broadcast view, no memory) and looked up
    after the conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    head = f"{block_prefix}.0."
    names = [n for n in model.state_dict() if n.startswith(head) and not n[len(head):].startswith(experts + ".")]
    state = {n: torch.full((1,), float(i), dtype=torch.float64).expand(2) for i, n in enumerate(names)}
    saved = revert_weight_conversion(model, state)
    pairs = []
    for key, value in saved.items():
        memory = names[int(value.reshape(-1)[0])]
        if key != memory:
            pairs.append((memory[len(head):], key[len(head):]))
    return tuple(sorted(pairs))


class SavedExpertsSource:
    """A float source checkpoint (format.checkpoint.SourceCheckpoint, checked by
    `expected_tensors.check_float_tensors`) under the saved names of its MoE model (module docstring); the same
    reading interface as SourceCheckpoint."""

    def __init__(self, source, moe: MoeAnatomy, block_prefix: str) -> None:
        self.source, self.moe, self.block_prefix = source, moe, block_prefix
        self.directory, self.config = source.directory, source.config
        self._virtual: dict[str, tuple[str, ExpertRole, int, range]] = {}  # saved -> (stored, role, expert, rows)
        self._renamed: dict[str, str] = {}  # saved name -> stored name
        fused = {f"{module.name}.{role.param}": role for module in moe.modules for role in module.roles}
        for name in source.keys():
            if name in fused:
                role = fused[name]
                for parts in role.parts:
                    for part in parts:
                        self._add(f"{part.module}.weight", (name, role, part.expert, part.rows))
                continue
            place = _in_block(name, block_prefix)
            if place is not None and moe.saved(place[1]) != place[1]:
                self._add(f"{block_prefix}.{place[0]}.{moe.saved(place[1])}", name)
        self._hidden = {v[0] for v in self._virtual.values()} | set(self._renamed.values())

    def _add(self, saved: str, what) -> None:
        if saved in self.source or saved in self._virtual or saved in self._renamed:
            stored = what if isinstance(what, str) else what[0]
            raise NanoqError(f"{self.source.file_of(stored)}: '{stored}' and '{saved}' are the same weight stored "
                             "twice (fused and per expert, or under both names)")
        if isinstance(what, str):
            self._renamed[saved] = what
        else:
            self._virtual[saved] = what

    def keys(self) -> list[str]:
        kept = [n for n in self.source.keys() if n not in self._hidden]
        return sorted(kept + list(self._virtual) + list(self._renamed))

    def __contains__(self, name: str) -> bool:
        return name in self._virtual or name in self._renamed or (name in self.source and name not in self._hidden)

    def stored_name(self, name: str) -> str:
        """The tensor in the files that holds `name`."""
        if name in self._virtual:
            return self._virtual[name][0]
        return self._renamed.get(name, name)

    def file_of(self, name: str):
        return self.source.file_of(self.stored_name(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._virtual:
            _, role, _, rows = self._virtual[name]
            return (len(rows), role.in_features)
        return self.source.shape(self.stored_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.stored_name(name))

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a copy); a per-expert weight of a fused parameter is read as its expert's slab alone."""
        if name not in self._virtual:
            return self.source.get(self.stored_name(name))
        from safetensors import safe_open

        from ..format.checkpoint import check_finite

        stored, role, expert, rows = self._virtual[name]
        file = self.source.file_of(stored)
        with safe_open(str(file), framework="pt") as handle:
            slab = handle.get_slice(stored)[expert:expert + 1][0]
        weight = slab[:, rows].t() if role.transposed else slab[rows]
        return check_finite(weight.contiguous().clone(), name, file)

    def items(self, names: list[str]):
        for name in names:
            yield name, self.get(name)


def _in_block(name: str, block_prefix: str) -> tuple[int, str] | None:
    head = block_prefix + "."
    if not name.startswith(head):
        return None
    index, _, rest = name[len(head):].partition(".")
    return (int(index), rest) if index.isdigit() else None


def memory_state(moe: MoeAnatomy, index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block `index`'s tensors by saved name relative to the block (`mlp.experts.3.gate_proj.weight`, ...) -> the
    state dict of transformers' decoder layer (`mlp.experts.gate_up_proj [E, 2I, H]`, ...). Per-expert weights
    are consumed from `state` (popped) as they are stacked, so one copy of the experts is held."""
    module = moe.modules[index]
    prefix = _block_head(module.name, moe.experts)
    out = {}
    for role in module.roles:
        experts = []
        for parts in role.parts:
            rows = [state.pop(f"{part.module}.weight"[len(prefix):]) for part in parts]
            weight = torch.empty((role.out_features, role.in_features), dtype=rows[0].dtype)
            for part, value in zip(parts, rows):
                weight[part.rows.start:part.rows.stop:part.rows.step] = value
            experts.append(weight.t() if role.transposed else weight)
        out[f"{moe.experts}.{role.param}"] = torch.stack(experts)
        del experts
    for name, tensor in state.items():
        out[moe.memory(name)] = tensor
    return out


def _block_head(experts_module: str, experts: str) -> str:
    """`model.layers.3.mlp.experts`, `mlp.experts` -> `model.layers.3.`"""
    return experts_module[: len(experts_module) - len(experts)]
