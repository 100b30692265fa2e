"""Search candidates and the cheap proxy that orders them.

Modes:
- `drop1`: every single-block deletion (n candidates);
- `swap-adjacent`: every exchange of two neighbouring blocks (n - 1 candidates);
- `drop1+swap`: greedy in two stages: the `drop1` candidates, then every exchange of two blocks that are
  neighbours once the best deletion of stage one is made, applied on top of it.

The proxy is each block's influence on the residual stream (ShortGPT's "block influence"): one minus the
mean cosine similarity of its input and output hidden states over the first search window. A deletion is
tried in order of increasing influence; an exchange in order of the pair's summed influence (a heuristic:
two blocks that change the stream little should commute). With a budget smaller than the candidate count,
the candidates the proxy likes best are the ones evaluated.
"""

from __future__ import annotations

import torch

from ..errors import NanoqError
from ..quantizers.anatomy import decoder_blocks
from .plan import LayerMap, build_layer_map
from .settings import MODES


@torch.inference_mode()
def block_influence(model, token_ids: torch.Tensor) -> list[float]:
    """Per decoder block, `1 - mean_t cos(h_in[t], h_out[t])` for `token_ids` (int64 `[1, T]`); float list."""
    records: dict[int, float] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    _, blocks = decoder_blocks(model, model.config.num_hidden_layers, "model config")
    for index, block in enumerate(blocks):
        def before(module, args, kwargs, index=index):
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).float()

        def after(module, args, kwargs, output, index=index):
            hidden = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(inputs.pop(index)[0], hidden.float()[0], dim=-1)
            records[index] = 1.0 - cosine.mean().item()

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        model(token_ids.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return [records[i] for i in range(len(blocks))]


def drop_one(num_layers: int, influence: list[float]) -> list[LayerMap]:
    """Every single deletion, least influential block first."""
    order = sorted(range(num_layers), key=lambda i: (influence[i], i))
    return [build_layer_map(num_layers, drop=[i]) for i in order]


def swap_adjacent(num_layers: int, influence: list[float], dropped: int | None = None) -> list[LayerMap]:
    """Every exchange of neighbouring blocks (neighbours after deleting `dropped`, which stays deleted),
    lowest summed influence first."""
    kept = [i for i in range(num_layers) if i != dropped]
    pairs = sorted(zip(kept, kept[1:]), key=lambda p: (influence[p[0]] + influence[p[1]], p))
    drop = [] if dropped is None else [dropped]
    return [build_layer_map(num_layers, drop=drop, swap=[pair]) for pair in pairs]


def stage_budgets(mode: str, budget: int, first_stage_size: int) -> tuple[int, int]:
    """How many candidates each stage may evaluate. One-stage modes: `budget`. `drop1+swap`: deletions get
    ceil(budget / 2), or all `first_stage_size` of them if fewer, and exchanges the rest."""
    if mode not in MODES:
        raise NanoqError(f"--search {mode!r}: expected one of {', '.join(MODES)}")
    if budget < 1:
        raise NanoqError(f"--budget {budget}: evaluate at least one candidate")
    if mode != "drop1+swap":
        return budget, 0
    if budget < 2:
        raise NanoqError("--budget 1: drop1+swap needs at least 2 (one per stage)")
    first = min(first_stage_size, (budget + 1) // 2)
    return first, budget - first
