"""The fused Triton dequantize-GEMM (triton_gemm) as a kernel: reads the stored tensors as they are."""

from __future__ import annotations

import importlib.util

import torch

from ..format.schemes import SchemeKind
from .base import LinearConfig
from .custom_ops import triton_linear, triton_weight_format
from .reference_linear import StoredTensorKernel

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TritonKernel(StoredTensorKernel):
    """Split-K (decode) and tiled (prefill) dequantize-GEMM on CUDA; no repack."""

    name = "triton"
    linear_op = triton_linear

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cuda":
            return False, f"runs on CUDA only (device {config.device_type})"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if config.scheme.kind not in (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL, SchemeKind.CODEBOOK):
            return False, f"no Triton dequantizer for scheme {config.scheme.name}"
        if config.scheme.quantizes_activations:
            return False, "no Triton int8 x int8 GEMM yet (int8 activations run the reference)"
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """Stored tensors, contiguous; tunes every M bucket of this shape now (never during graph capture)."""
        from .triton_gemm import warm_up

        prepared = {name: t.contiguous() for name, t in tensors.items()}
        weight, side = triton_weight_format(config.scheme, prepared)
        warm_up(prepared["qweight"], prepared["scales"], side, weight, config.out_features, config.in_features,
                config.act_dtype)
        return prepared
