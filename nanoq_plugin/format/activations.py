"""Dynamic per-token int8 activations (scheme `int8-a8`): the executable spec.

A layer of scheme `int8-a8` stores what `int8` stores (qweight int8 `[K, N]`, scales float16 `[N]`, one
symmetric scale per output channel). At run time its input is quantized per token (row), with the scale
computed in float32 from that row alone:

    s_x[m]    = max_k |x[m, k]| / 127                        (float32; a row of zeros has s_x = 0, x_q = 0)
    x_q[m, k] = clamp(round_half_even(x[m, k] / s_x[m]), -127, 127)     (int8)
    acc[m, n] = sum_k x_q[m, k] * q[k, n]                    (exact integer sum: int32 in the kernels)
    y[m, n]   = (float32(acc[m, n]) * s_x[m]) * float32(s_w[n])   -> the activation dtype

which is what vLLM and compressed-tensors call W8A8 int8 with dynamic per-token input scales. Kernels are
tested against `int8_dynamic_linear` below; an exact kernel agrees with it before the final rounding.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., K]` (any float dtype) -> (x_q int8 `[..., K]`, s_x float32 `[..., 1]`) as in the module docstring."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x_q = torch.round(xf / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x_q, scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` -> `x_q * s_x` in x.dtype: the values int8-a8 multiplies, for float models that stand for a
    checkpoint (eval.reference_model); equal to the spec up to the float rounding of the products."""
    x_q, scale = quantize_per_token(x)
    return (x_q.to(torch.float32) * scale).to(x.dtype)


def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` @ int8 weight with per-token int8 activations -> `[..., N]` in x.dtype.

    qweight int8 `[K, N]`, scales float16/float32 `[N]` (format.layout's int8 tensors). The integer sums are
    exact (float64 holds them: |acc| <= 127 * 127 * K < 2**53), so this runs on any device and dtype.
    """
    x_q, x_scale = quantize_per_token(x)
    acc = torch.matmul(x_q.to(torch.float64), qweight.to(torch.float64)).to(torch.float32)
    return (acc * x_scale * scales.to(torch.float32)).to(x.dtype)
