"""What `nanoq inspect` says about a mixture-of-experts checkpoint: per MoE block its experts, the scheme of each
expert role, and the routed-token counts the quantizer recorded in the manifest's `moe` section (calibrated
methods; data-free ones such as RTN route nothing: "not recorded")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .expected_tensors import model_tensors
from .validate import NanoCheckpoint


@dataclass(frozen=True)
class MoeSummary:
    """`expert_modules`: every stored expert projection (listed per block instead of one by one); `lines`:
    the text to print (empty for a dense model)."""

    expert_modules: frozenset[str]
    lines: tuple[str, ...]


def _block_index(block: str) -> str | None:
    found = re.findall(r"\.(\d+)(?=\.|$)", block)
    return found[-1] if found else None


def moe_summary(checkpoint: NanoCheckpoint) -> MoeSummary:
    """The MoE blocks of `checkpoint` (validated) as `nanoq inspect` prints them."""
    model = model_tensors(checkpoint.tensors.config, str(checkpoint.directory / "config.json"))
    if not model.experts:
        return MoeSummary(frozenset(), ())
    recorded = checkpoint.manifest.get("moe", {})
    modules = checkpoint.quant_config.modules
    lines = ["mixture of experts (experts stored per expert; routed tokens: calibration tokens the router sent "
             "to each expert)",
             f"{'block':<36} {'experts':>7} {'top_k':>5}  {'schemes':<40} routed tokens"]
    names: set[str] = set()
    for experts in model.experts:
        names.update(experts.modules())
        roles = []
        for role in experts.roles:
            scheme = modules.get(role.modules()[0])
            roles.append(f"{role.param} {scheme.name if scheme else 'float'}")
        record = recorded.get(_block_index(experts.block) or "", {})
        routed = record.get("routed_tokens")
        top_k = record.get("top_k", "?")
        if routed is None:
            tokens = "not recorded"
        else:
            ordered = sorted(routed)
            floor = record.get("floor") or []
            tokens = (f"min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}; floor "
                      + (f"(< {record.get('floor_tokens', '?')} tokens, calibrated on all): experts "
                         f"{', '.join(map(str, floor))}" if floor else "none"))
        lines.append(f"{experts.block:<36} {experts.num_experts:>7} {top_k!s:>5}  {', '.join(roles):<40} {tokens}")
        if routed is not None:
            lines.append(f"{'':<36} per expert: {' '.join(map(str, routed))}")
    return MoeSummary(frozenset(names), tuple(lines))
