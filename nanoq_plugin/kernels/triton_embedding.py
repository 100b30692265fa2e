"""Quantized embedding gather in Triton: dequantize only the table rows that are looked up.

The table `[V, H]` is stored like the weight of a linear with N = V outputs and K = H inputs (the layout
of a tied LM head), so a token's row is column `id` of the stored tensors. Each program dequantizes
`BLOCK_H` hidden elements of `BLOCK_T` tokens with the shared `triton_dequant.load_weight_tile`, passing
the token ids as the tile's column indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dequant import JIT_FMT_INT8_CHANNEL, load_weight_tile
from .triton_gemm import WeightFormat


@triton.jit
def embedding_gather_kernel(
    ids_ptr,  # int64 [T] token ids in [0, V)
    qweight_ptr,  # stored table codes, K = H, N = V (triton_dequant layout table)
    scales_ptr,  # float16 [H/G, V] or [V]
    side_ptr,  # uint8 [H/G, V] or a dummy
    out_ptr,  # [T, H] output dtype
    T, H,
    stride_q, stride_s,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    ids = tl.load(ids_ptr + offs_t, mask=mask_t, other=0).to(tl.int32)
    mask = (offs_h < H)[:, None] & mask_t[None, :]
    rows = load_weight_tile(qweight_ptr, scales_ptr, side_ptr, pid_h * BLOCK_H, ids, mask_t, H, stride_q, stride_s,
                            FMT, BITS, GROUP, HAS_ZEROS, BLOCK_H)  # [BLOCK_H, BLOCK_T]
    if FMT == JIT_FMT_INT8_CHANNEL:
        rows *= tl.load(scales_ptr + ids, mask=mask_t, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[None, :] * H + offs_h[:, None], rows.to(out_ptr.dtype.element_ty), mask=mask)


def embedding_gather(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    side: torch.Tensor | None,
    weight: WeightFormat,
    hidden: int,
    dtype: torch.dtype,
    block_t: int = 16,
    block_h: int = 128,
) -> torch.Tensor:
    """Rows `ids [...]` (int) of the quantized table -> `[..., hidden]` in `dtype`."""
    flat = ids.reshape(-1).to(torch.int64)
    out = torch.empty((flat.numel(), hidden), dtype=dtype, device=qweight.device)
    if flat.numel():
        block_h = min(block_h, triton.next_power_of_2(hidden))
        grid = (triton.cdiv(flat.numel(), block_t), triton.cdiv(hidden, block_h))
        embedding_gather_kernel[grid](
            flat, qweight, scales, side if side is not None else scales, out,
            flat.numel(), hidden, qweight.stride(0), scales.stride(0) if scales.dim() == 2 else 0,
            **weight.constexprs(), BLOCK_T=block_t, BLOCK_H=block_h,
        )
    return out.view(*ids.shape, hidden)
