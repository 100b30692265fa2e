"""Weight-only int8 and int2/3/4 linears on x86 CPUs without a native bfloat16 dot product: our AVX2 + FMA C++ ops
(`csrc/weight_only_avx2.cpp`), built on first use.

Without AVX-512 BF16 (AVX2-only CPUs, AVX-512 CPUs before Cooper Lake / Zen 4) bfloat16 and float16 GEMMs are
emulated, and PyTorch's weight-only kernels call one from a dozen activation rows on (`cpu_dense`): at 16 rows
they run ~7x slower than float32 FMAs. These kernels decode each K-chunk of 16 outputs into a float32 panel
in L1 and multiply with FMAs, whatever the activation dtype, so decode and prefill both stay on float32
arithmetic.

Where they run: `can_implement` takes a CPU with AVX2 and without AVX-512 BF16 (which runs the native bfloat16
kernels instead); float32 activations only without AVX-512 (there MKL's float32 GEMM on the dequantized weight,
the reference, is faster at prefill sizes).

    kernel              scheme                      repacked once after loading
    cpu_int8_wo_avx2    int8 per channel            packed int8 [N/16, K, 16], scales float32 [N]
    cpu_int4_avx2       int2/3/4 per group (any G)  packed uint8 [N/16, K, 8] (two codes a byte: outputs j and
                                                    j + 8 of each block of 16), scales and offsets float32
                                                    [K/G, N] with W = code * scale + offset
"""

from __future__ import annotations

import torch

from ..format.packing import unpack_codes
from ..format.reference import symmetric_zero
from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_extension import build_cpu_extension, missing_isa
from .cpu_grouped import RowOp
from .cpu_isa import cpu_features

BLOCK = 16  # outputs per block
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def load_extension() -> str:
    """Build (once per machine) and load the `nano_cpu::` weight-only AVX2 ops; '' on success, else why not."""
    return build_cpu_extension("nanoq_cpu_weight_only_avx2", "weight_only_avx2.cpp", "avx2", fakes={
        "int8_weight_only_linear_avx2": lambda x, packed, scales: x.new_empty((x.shape[0], packed.shape[0] * BLOCK)),
        "int4_linear_avx2": lambda x, packed, scales, offsets, group_size: x.new_empty(
            (x.shape[0], packed.shape[0] * BLOCK))})


class WeightOnlyAvx2Kernel:
    """What both kernels share: where they run (module docstring). Subclasses say which schemes they take."""

    def takes(self, config: LinearConfig) -> str:
        """'' if the scheme fits this kernel, else why not."""
        raise NotImplementedError

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        why = self.takes(config)
        if why:
            return False, why
        if config.out_features % BLOCK:
            return False, f"output features ({config.out_features}) must be a multiple of {BLOCK}"
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        features = cpu_features()
        if features.avx512_bf16:
            return False, "this CPU has AVX-512 BF16: the native bfloat16 kernels run instead"
        if config.act_dtype == torch.float32 and features.avx512:
            return False, "float32 activations on AVX-512: MKL's float32 GEMM on the dequantized weight runs instead"
        why = missing_isa("avx2") or load_extension()
        return (False, why) if why else (True, "")


class CpuInt8WeightOnlyAvx2Kernel(WeightOnlyAvx2Kernel):
    """`x @ W.T` with weight-only int8 per channel, float32 FMAs."""

    name = "cpu_int8_wo_avx2"
    supports_gather = True

    def takes(self, config: LinearConfig) -> str:
        scheme = config.scheme
        if scheme.kind is not SchemeKind.INT8_CHANNEL or scheme.quantizes_activations:
            return f"needs weight-only int8 per channel (scheme {scheme.name})"
        return ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight int8 `[K, N]`, scales `[N]` -> packed int8 `[N/16, K, 16]`, scales float32 `[N]`."""
        qweight = tensors["qweight"]
        k, n = qweight.shape
        return {"packed": qweight.reshape(k, n // BLOCK, BLOCK).permute(1, 0, 2).contiguous(),
                "scales": tensors["scales"].to(torch.float32).contiguous()}

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        flat = x.reshape(-1, config.in_features).contiguous()
        out = torch.ops.nano_cpu.int8_weight_only_linear_avx2(flat, prepared["packed"], prepared["scales"])
        return out.view(*x.shape[:-1], config.out_features)

    def row_op(self, prepared: dict[str, torch.Tensor], config: LinearConfig, x_dtype: torch.dtype,
               rows: int) -> RowOp:
        """The one op `apply` runs, at every size (cpu_grouped)."""
        return RowOp("nano_cpu::int8_weight_only_linear_avx2", (prepared["packed"], prepared["scales"]))

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows `ids [...]` (the table is `[N, K]` = `[vocab, hidden]`) -> `[..., K]` in `dtype`."""
        rows = prepared["packed"][torch.div(ids, BLOCK, rounding_mode="floor"), :, ids % BLOCK]  # [..., K]
        return rows.to(dtype) * prepared["scales"][ids].to(dtype).unsqueeze(-1)


class CpuInt4Avx2Kernel(WeightOnlyAvx2Kernel):
    """`x @ W.T` with group-wise 2/3/4-bit weights, float32 FMAs."""

    name = "cpu_int4_avx2"
    supports_gather = False

    def takes(self, config: LinearConfig) -> str:
        scheme = config.scheme
        if scheme.kind is not SchemeKind.INT_GROUP or scheme.bits > 4:
            return f"needs a group-wise scheme of at most 4 bits (scheme {scheme.name})"
        return ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """Stored qweight/scales/zeros -> packed uint8 `[N/16, K, 8]`, scales and offsets float32 `[K/G, N]`."""
        scheme = config.scheme
        n, k = config.out_features, config.in_features
        codes = unpack_codes(tensors["qweight"], scheme.bits)  # [K, N] uint8, W = (code - zero) * scale
        blocks = codes.reshape(k, n // BLOCK, 2, BLOCK // 2).permute(1, 0, 2, 3)  # [N/16, K, 2, 8]
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).contiguous()
        scales = tensors["scales"].to(torch.float32)
        zeros = (torch.full_like(scales, float(symmetric_zero(scheme.bits))) if scheme.symmetric
                 else tensors["zeros"].to(torch.float32))
        return {"packed": packed, "scales": scales.contiguous(), "offsets": (-zeros * scales).contiguous()}

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        flat = x.reshape(-1, config.in_features).contiguous()
        out = torch.ops.nano_cpu.int4_linear_avx2(flat, prepared["packed"], prepared["scales"], prepared["offsets"],
                                                  config.scheme.group_size)
        return out.view(*x.shape[:-1], config.out_features)

    def row_op(self, prepared: dict[str, torch.Tensor], config: LinearConfig, x_dtype: torch.dtype,
               rows: int) -> RowOp:
        """The one op `apply` runs, at every size (cpu_grouped)."""
        return RowOp("nano_cpu::int4_linear_avx2", (prepared["packed"], prepared["scales"], prepared["offsets"]),
                     (config.scheme.group_size,))
