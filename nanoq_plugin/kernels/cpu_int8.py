"""Per-channel int8 on the CPU through PyTorch's own weight-only kernel `aten._weight_int8pack_mm`.

Repacked once: qweight int8 `[K, N]` -> `weight_nk` int8 `[N, K]` (contiguous; the stored copy is dropped),
scales float16 `[N]` -> the activation dtype. The same `[N, K]` table serves embedding lookups (rows).
From `cpu_dense.DENSE_MIN_ROWS` activation rows on (prefill, large batches) the int8 rows are converted to the
activation dtype in a scratch buffer (exact: |q| <= 127) and multiplied by oneDNN's GEMM, the scales applied to
the output: `x @ (q * s).T == (x @ q.T) * s`.
"""

from __future__ import annotations

import torch

from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_dense import DENSE_MIN_ROWS, chunked_matmul

# 16-bit activations only: measured here, their float32 path is 20-80x slower than MKL's float32 GEMM on the
# dequantized weight at prefill sizes (the reference kernel), so float32 models use the reference.
ACT_DTYPES = (torch.bfloat16, torch.float16)


class CpuInt8ChannelKernel:
    """`x @ W.T` with int8 weights and per-output-channel scales, on the CPU."""

    name = "cpu_int8pack"
    supports_gather = True

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if config.scheme.kind is not SchemeKind.INT8_CHANNEL or config.scheme.quantizes_activations:
            return False, f"needs weight-only int8 per channel (scheme {config.scheme.name})"
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return False, f"torch {torch.__version__} has no aten._weight_int8pack_mm"
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight int8 `[K, N]`, scales `[N]` -> weight_nk int8 `[N, K]`, scales `[N]` in the activation dtype."""
        return {
            "weight_nk": tensors["qweight"].t().contiguous(),
            "scales": tensors["scales"].to(config.act_dtype).contiguous(),
        }

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        scales = prepared["scales"]
        if scales.dtype != x.dtype:
            scales = scales.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        weight = prepared["weight_nk"]
        if flat.shape[0] >= DENSE_MIN_ROWS:
            out = chunked_matmul(flat, config.out_features, lambda n0, n1, buffer: buffer.copy_(weight[n0:n1]))
            out.mul_(scales)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, weight, scales)
        return out.view(*x.shape[:-1], config.out_features)

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows `ids [...]` -> `[..., K]` in `dtype` (the table is `[N, K]` = `[vocab, hidden]`)."""
        rows = prepared["weight_nk"][ids].to(dtype)
        return rows * prepared["scales"][ids].to(dtype).unsqueeze(-1)
