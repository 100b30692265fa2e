"""WikiText-style sliding-window perplexity, computed for several models over the same windows in one pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` are fed; the last `scored` positions are scored (not position `begin` itself)."""

    begin: int
    end: int
    scored: int


def sliding_windows(num_tokens: int, ctx: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """Windows of `ctx` tokens every `stride` tokens; each scores only the tokens no earlier window scored.

    This is the Hugging Face perplexity recipe: every token is predicted once, with up to `ctx - stride`
    tokens of context carried over from the previous window.
    """
    if ctx < 2 or stride < 1 or stride > ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + ctx, num_tokens)
        if end - begin < 2:
            break
        windows.append(Window(begin, end, min(end - previous_end, end - begin - 1)))
        previous_end = end
        if end == num_tokens or (max_windows is not None and len(windows) >= max_windows):
            break
    return windows


@dataclass
class PerplexityResult:
    """Per-model perplexity over the same windows, and the mean cosine of last-position logits to `reference`."""

    windows: int
    scored_tokens: int
    perplexity: dict[str, float] = field(default_factory=dict)
    last_logit_cosine: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def evaluate_perplexity(
    models: dict[str, torch.nn.Module],
    token_ids: torch.Tensor,
    ctx: int = 512,
    stride: int = 256,
    max_windows: int | None = None,
    reference: str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of each model on `token_ids` (int64 `[T]`); cosine of last logits against `models[reference]`."""
    windows = sliding_windows(int(token_ids.numel()), ctx, stride, max_windows)
    nll = {name: 0.0 for name in models}
    cosine_sum = {name: 0.0 for name in models if reference is not None and name != reference}
    scored = 0
    bar = tqdm(windows, desc="perplexity", unit="window", disable=not progress)  # with the ETA, and running ppl
    for window in bar:
        ids = token_ids[window.begin:window.end].unsqueeze(0)
        targets = ids[0, -window.scored:]
        last_logits = {}
        for name, model in models.items():
            logits = model(ids.to(model.device)).logits[0].float().cpu()
            log_probs = torch.log_softmax(logits[-window.scored - 1:-1], dim=-1)
            nll[name] -= log_probs.gather(1, targets.unsqueeze(1)).sum().item()
            last_logits[name] = logits[-1]
        for name in cosine_sum:
            cosine_sum[name] += torch.nn.functional.cosine_similarity(
                last_logits[name], last_logits[reference], dim=0
            ).item()
        scored += window.scored
        if progress:
            bar.set_postfix({name: f"{math.exp(nll[name] / scored):.3f}" for name in models}, refresh=False)
    result = PerplexityResult(windows=len(windows), scored_tokens=scored)
    for name in models:
        result.perplexity[name] = float(torch.exp(torch.tensor(nll[name] / scored)))
    for name, total in cosine_sum.items():
        result.last_logit_cosine[name] = total / len(windows)
    return result
