"""Routing agreement of a mixture-of-experts checkpoint with its float base: the fraction of tokens for which the
quantized model's router picks the same top-k experts (as a set) as the base model's, per MoE block and overall.

The experts module of every MoE block is called by transformers' own routing code as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])` (transformers' experts contract, which
`engines.transformers.NanoExperts` keeps), so a forward pre-hook on it sees each token's chosen experts in either
model, whatever the family's router is. Both models run the same windows in the same order (`eval.perplexity`),
so the i-th call of a block in one model meets the same tokens as the i-th call in the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NanoqError


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> experts module of `model`: transformers' fused experts modules (3-D parameters) and their nano
    replacements."""
    from ..engines.transformers import NanoExperts

    return {name: module for name, module in model.named_modules()
            if isinstance(module, NanoExperts) or any(p.dim() == 3 for p in module.parameters(recurse=False))}


@dataclass
class RoutingRecorder:
    """Records, per experts module of `model`, the sorted top-k expert ids `[T, k]` of every call, while attached
    (`model` None: records nothing)."""

    model: nn.Module | None
    calls: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "RoutingRecorder":
        for name, module in experts_modules(self.model).items() if self.model is not None else ():
            self.calls[name] = []
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def _hook(self, name: str):
        def record(module, args, kwargs):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.calls[name].append(top_k_index.detach().sort(dim=-1).values.cpu())
        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def routing_agreement(base: RoutingRecorder, quantized: RoutingRecorder) -> dict:
    """`{"overall": fraction, "tokens": routed tokens per block, "blocks": {experts module: fraction}}` over
    the calls both recorders saw (the same windows, in order)."""
    if set(base.calls) != set(quantized.calls):
        raise NanoqError(f"the base and quantized models have different MoE blocks ({sorted(base.calls)[:2]} ... vs "
                         f"{sorted(quantized.calls)[:2]} ...): routing cannot be compared")
    blocks, agree_total, token_total = {}, 0, 0
    for name in sorted(base.calls, key=_natural):
        ours, theirs = quantized.calls[name], base.calls[name]
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise NanoqError(f"MoE block '{name}' saw different inputs in the base and quantized models: "
                             "routing cannot be compared")
        agree = sum(int((a == b).all(dim=-1).sum()) for a, b in zip(ours, theirs))
        tokens = sum(a.shape[0] for a in ours)
        blocks[name] = agree / tokens if tokens else None
        agree_total, token_total = agree_total + agree, token_total + tokens
    per_block_tokens = token_total // len(blocks) if blocks else 0
    return {"overall": agree_total / token_total if token_total else None, "tokens": per_block_tokens,
            "blocks": blocks}


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
