"""The schemes of a mixture-of-experts block's expert projections, as a serving engine's fused-MoE layer needs
them: one scheme for every expert's gate and up projections (the engine's `w13` tensor) and one for every
expert's down projection (`w2`), per block (docs/format.md, "Mixture of experts").

A nano checkpoint stores each expert projection per expert, under the name transformers' `save_pretrained`
writes (`model.layers.3.mlp.experts.7.gate_proj`, Mixtral `model.layers.3.block_sparse_moe.experts.7.w1`);
quantized ones are listed in `quantization_config.modules`, float ones keep `.weight`. Engines import this
module; it imports no engine. (`format.validate` refuses a checkpoint that breaks one scheme per role before
an engine starts; `role_scheme` checks it again where an engine resolves a layer's schemes.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import NanoqError
from ..format.quant_config import NanoQuantConfig
from ..format.schemes import Scheme

GATE_UP, DOWN = "gate/up", "down"
EXPERT_PROJECTION = re.compile(r"^(?P<block>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>[^.]+)$")


def expert_projections(module_names: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Per-expert projection modules grouped by experts module and projection name:
    `{"model.layers.0.mlp.experts": {"gate_proj": [module, ...], ...}}` (modules sorted by expert number)."""
    blocks: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for name in module_names:
        match = EXPERT_PROJECTION.match(name)
        if match:
            blocks.setdefault(match["block"], {}).setdefault(match["projection"], []).append(
                (int(match["expert"]), name))
    return {block: {proj: [name for _, name in sorted(found)] for proj, found in projections.items()}
            for block, projections in blocks.items()}


def quantized_expert_blocks(quant_config: NanoQuantConfig) -> list[str]:
    """The experts modules (`model.layers.0.mlp.experts`) of which some expert projection is quantized."""
    return sorted(expert_projections(quant_config.modules))


def _describe(schemes: dict[Scheme | None, list[str]]) -> str:
    parts = []
    for scheme, modules in schemes.items():
        shown = ", ".join(modules[:2]) + (f" and {len(modules) - 2} more" if len(modules) > 2 else "")
        parts.append(f"{scheme.name if scheme else 'float'} ({shown})")
    return "; ".join(parts)


def role_scheme(quant_config: NanoQuantConfig, block: str, modules: Iterable[str], role: str) -> Scheme | None:
    """The one scheme (None = float) of `modules`, the expert projections of `role` in experts module `block`;
    NanoqError naming the block and the schemes found when they differ (an engine's fused-MoE layer holds one
    tensor per role for all experts)."""
    found: dict[Scheme | None, list[str]] = {}
    for module in modules:
        found.setdefault(quant_config.scheme_of(module), []).append(module)
    if len(found) > 1:
        raise NanoqError(f"config.json: the experts of {block} use more than one scheme for their {role} projections "
                         f"({_describe(found)}); an engine's fused-MoE layer needs one scheme per role in a block: "
                         "quantize all of them alike")
    return next(iter(found)) if found else None
