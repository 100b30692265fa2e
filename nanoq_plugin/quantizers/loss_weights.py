"""How much the language-model loss cares about an error added to the residual stream at each block's output,
measured on calibration windows one block at a time (the allocator's weights).

A quantized linear of block `l` adds an error `δ` to the residual stream `h_l` (the block's output). To second
order the loss grows by `½ δᵀ F_l δ`, with `F_l` the Fisher information of `h_l`; its diagonal is estimated
isotropically by `f_l = mean over tokens and dims of (∂loss/∂h_l)²`, so a linear's expected loss change is
about `f_l` times its output error `E‖ΔW x‖²` (allocator.measure_group).

The gradients come from one backward pass through the float model, run block by block like the forward: the
blocks' inputs are kept from the forward pass, each block is rebuilt from the checkpoint on the way back and
differentiated on its stored input, so the whole model is never in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .block_runner import BlockRunner


def head_loss_gradient(final: torch.Tensor, ids: torch.Tensor, norm: nn.Module,
                       head_weight: torch.Tensor) -> torch.Tensor:
    """∂loss/∂final `[B, L, H]` float32 of the mean next-token cross-entropy of `ids [B, L]`, from the last
    block's output `final [B, L, H]` through the final norm (`BlockRunner.final_norm`) and the LM head
    (`head_weight [V, H]`); one window at a time, so the logits of one window are the largest tensor."""
    gradient = torch.empty_like(final, dtype=torch.float32)
    count = ids[:, 1:].numel()
    head_weight = head_weight.to(torch.float32)
    for row in range(final.shape[0]):
        hidden = final[row:row + 1].detach().to(torch.float32).requires_grad_(True)
        logits = norm(hidden)[:, :-1] @ head_weight.t()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[row:row + 1, 1:].reshape(-1),
                                           reduction="sum") / count
        loss.backward()
        gradient[row] = hidden.grad[0]
    return gradient


def residual_fisher(runner: BlockRunner, build_block: Callable[[int], nn.Module], block_inputs: list[torch.Tensor],
                    output_gradient: torch.Tensor) -> list[float]:
    """`f_l` for every block `l`: the mean squared gradient of the loss at the block's output.

    `block_inputs[l] [B, L, H]` (any float dtype) is block l's input in the forward pass, `output_gradient [B, L, H]` the
    gradient at the last block's output, `build_block(l)` block l as a float32 module.
    """
    weights = [0.0] * len(block_inputs)
    gradient = output_gradient
    for index in reversed(range(len(block_inputs))):
        weights[index] = gradient.pow(2).mean().item()
        if index == 0:
            break
        block = build_block(index)
        for parameter in block.parameters():
            parameter.requires_grad_(False)
        upstream = torch.empty_like(gradient)
        batch = runner.batch(gradient.shape[1])
        for start in range(0, gradient.shape[0], batch):
            chunk = block_inputs[index][start:start + batch].to(torch.float32).requires_grad_(True)
            runner.call(block, chunk).backward(gradient[start:start + batch])
            upstream[start:start + batch] = chunk.grad
        gradient = upstream
    return weights
