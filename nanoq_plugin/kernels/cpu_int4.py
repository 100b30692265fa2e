"""Group-wise int2/int3/int4 on the CPU on PyTorch's int4 packing: its weight-only kernel
`aten._weight_int4pack_mm_for_cpu`, or on CPUs with AVX-512 BF16 our panel kernel on the same tensors.

PyTorch's kernel computes `W[n, k] = (q[n, k] - 8) * s[k // G, n] + z[k // G, n]` with 4-bit codes `q` packed by
`aten._convert_weight_to_int4pack_for_cpu` and `scale_zeros [K/G, N, 2]` (s, z) in the activation dtype.
Our codes satisfy `W = (c - zero) * scale` (docs/FORMAT.md), so the repack once after loading is

    q = c + shift,  shift = clamp(8 - zero, 0, 16 - 2**b),  z = (8 - shift - zero) * scale

which keeps `z = 0` for every symmetric scheme (2**(b-1) + shift = 8), so no precision is lost in z.
Codes of fewer than 4 bits are held in 4 bits after the repack (0.5 byte per weight instead of b/8).
The kernel needs N a multiple of 16.

PyTorch's kernel decodes the weight once per activation row, so its time grows almost linearly with rows. What
`apply` (and `row_op`, for a MoE layer's grouped experts) runs is chosen in one place (`path_for`):

    Int4Path  where                                                          rows
    PANEL     bfloat16 activations, AVX-512 BF16, N a multiple of 64, the    all
              packing below: `nano_cpu::int4pack_linear_avx512bf16` decodes
              q - 8 to bfloat16 by a table lookup (once per 6-row tile up to
              24 rows, beyond that once into a panel for all rows),
              `vdpbf16ps`, the scales applied to the sums
    DENSE     elsewhere, N a multiple of 64 and the packing below: the       INT4_DENSE_MIN_ROWS and more
              packed rows expanded into the activation dtype, oneDNN's
              GEMM (`cpu_dense`)
    ATEN      elsewhere                                                      the rest

The panel is faster than PyTorch's kernel from one row on, and its lead grows with the rows (it overtakes a bf16
GEMM on the dequantized weight as well): benchmarks/int4_rows_cpu.py times them side by side.

The panel and the dense path read PyTorch's packed layout, which depends on the CPU: with AVX-512 every block of
64 rows `[64, K]` is stored as bytes `[K, 32]` whose low nibbles are rows 0-31 and high nibbles rows 32-63 of the
block. The layout is checked once per process on a probe (`blocked64_layout`); where it differs PyTorch's kernel
runs at every size.
"""

from __future__ import annotations

import enum
import functools

import torch

from ..format.packing import unpack_codes
from ..format.reference import symmetric_zero
from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_dense import INT4_DENSE_MIN_ROWS, chunked_matmul, scratch
from .cpu_extension import build_cpu_extension, missing_isa
from .cpu_grouped import RowOp

# 16-bit activations only: measured here, their float32 path is 20-80x slower than MKL's float32 GEMM on the
# dequantized weight at prefill sizes (the reference kernel), so float32 models use the reference.
ACT_DTYPES = (torch.bfloat16, torch.float16)
GROUP_SIZES = (32, 64, 128, 256)
BLOCK_ROWS = 64


class Int4Path(enum.Enum):
    """What `CpuInt4GroupKernel.apply` runs for some rows (module docstring); a single op's name as its value."""

    ATEN = "aten::_weight_int4pack_mm_for_cpu"
    PANEL = "nano_cpu::int4pack_linear_avx512bf16"
    DENSE = "expand + oneDNN GEMM"


def load_panel_extension() -> str:
    """Build (once per machine) and load `nano_cpu::int4pack_linear_avx512bf16`; '' on success, else why not."""
    return build_cpu_extension("nanoq_cpu_int4pack_avx512bf16", "int4pack_avx512bf16.cpp", "avx512",
                               flags=("-mavx512bf16",), fakes={
                                   "int4pack_linear_avx512bf16": lambda x, packed, scale_zeros, group_size:
                                       x.new_empty((x.shape[0], packed.shape[0]))})


def panel_missing(config: LinearConfig, x_dtype: torch.dtype) -> str:
    """'' if the bfloat16 panel op runs `config`'s weight for activations of `x_dtype` here, else why not."""
    if x_dtype != torch.bfloat16:
        return f"needs bfloat16 activations (got {x_dtype})"
    if config.out_features % BLOCK_ROWS:
        return f"output features ({config.out_features}) must be a multiple of {BLOCK_ROWS}"
    if not blocked64_layout():
        return "this torch's int4 packing is not the AVX-512 blocked layout"
    return missing_isa("avx512_bf16") or load_panel_extension()


def unpack_blocked64(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PyTorch's AVX-512 int4 packing of `rows` (a multiple of 64) weight rows, uint8 `[rows, K/2]` -> the
    4-bit codes uint8 `[rows, K]` written into `out` (returned)."""
    rows, k = out.shape
    blocks = packed.view(rows // BLOCK_ROWS, k, BLOCK_ROWS // 2)
    halves = out.view(rows // BLOCK_ROWS, 2, BLOCK_ROWS // 2, k)
    halves[:, 0].copy_((blocks & 15).transpose(1, 2))
    halves[:, 1].copy_((blocks >> 4).transpose(1, 2))
    return out


@functools.cache
def blocked64_layout() -> bool:
    """True if this process's `_convert_weight_to_int4pack_for_cpu` writes the layout `unpack_blocked64` reads."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    probe = torch.randint(0, 16, (2 * BLOCK_ROWS, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    if packed.shape != (probe.shape[0], probe.shape[1] // 2) or packed.dtype != torch.uint8:
        return False
    return torch.equal(unpack_blocked64(packed, torch.empty(probe.shape, dtype=torch.uint8)).to(torch.int32), probe)


class CpuInt4GroupKernel:
    """`x @ W.T` with group-wise 2/3/4-bit weights, on the CPU."""

    name = "cpu_int4pack"
    supports_gather = False

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        scheme = config.scheme
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if scheme.kind is not SchemeKind.INT_GROUP or scheme.bits > 4:
            return False, f"needs a group-wise scheme of at most 4 bits (scheme {scheme.name})"
        if scheme.group_size not in GROUP_SIZES:
            return False, f"group size {scheme.group_size} is not one of {GROUP_SIZES}"
        if config.out_features % 16:
            return False, f"output features ({config.out_features}) must be a multiple of 16"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """Stored qweight/scales/zeros -> `packed` uint8 `[N, K/2]` and `scale_zeros [K/G, N, 2]` (activation dtype)."""
        # probed (and built, cached) here, at load: `apply` may run inside a graph torch.compile traces
        blocked64_layout()
        panel_missing(config, config.act_dtype)
        scheme = config.scheme
        groups, g = config.in_features // scheme.group_size, scheme.group_size
        scales = tensors["scales"].to(torch.float32)
        if scheme.symmetric:
            zeros = torch.full_like(scales, float(symmetric_zero(scheme.bits)))
        else:
            zeros = tensors["zeros"].to(torch.float32)
        shift = torch.clamp(8 - zeros, 0, 16 - (1 << scheme.bits))  # [K/G, N]
        codes = unpack_codes(tensors["qweight"], scheme.bits).to(torch.int32).view(groups, g, config.out_features)
        codes = (codes + shift.to(torch.int32).unsqueeze(1)).view(config.in_features, config.out_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
        offsets = (8 - shift - zeros) * scales
        scale_zeros = torch.stack([scales, offsets], dim=-1).to(config.act_dtype).contiguous()
        return {"packed": packed, "scale_zeros": scale_zeros}

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        scale_zeros = prepared["scale_zeros"]
        if scale_zeros.dtype != x.dtype:
            scale_zeros = scale_zeros.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        path = self.path_for(flat.shape[0], config, x.dtype)
        if path is Int4Path.DENSE:
            out = chunked_matmul(flat, config.out_features,
                                 lambda n0, n1, buffer: self._expand(prepared["packed"], scale_zeros, config, n0, n1,
                                                                     buffer),
                                 row_multiple=BLOCK_ROWS)
        elif path is Int4Path.PANEL:
            out = torch.ops.nano_cpu.int4pack_linear_avx512bf16(flat, prepared["packed"], scale_zeros,
                                                                config.scheme.group_size)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, prepared["packed"], config.scheme.group_size,
                                                             scale_zeros)
        return out.view(*x.shape[:-1], config.out_features)

    def row_op(self, prepared: dict[str, torch.Tensor], config: LinearConfig, x_dtype: torch.dtype,
               rows: int) -> RowOp | None:
        """The one op `apply` runs for `rows` rows of `x_dtype` (cpu_grouped); None where it expands the weight."""
        path = self.path_for(rows, config, x_dtype)
        if path is Int4Path.DENSE or prepared["scale_zeros"].dtype != x_dtype:
            return None
        return RowOp(path.value, (prepared["packed"], prepared["scale_zeros"]), (config.scheme.group_size,))

    @staticmethod
    def path_for(rows: int, config: LinearConfig, x_dtype: torch.dtype) -> Int4Path:
        """What runs `rows` activation rows of `x_dtype` (module docstring)."""
        if not panel_missing(config, x_dtype):
            return Int4Path.PANEL
        if rows >= INT4_DENSE_MIN_ROWS and config.out_features % BLOCK_ROWS == 0 and blocked64_layout():
            return Int4Path.DENSE
        return Int4Path.ATEN

    @staticmethod
    def _expand(packed: torch.Tensor, scale_zeros: torch.Tensor, config: LinearConfig, n0: int, n1: int,
                buffer: torch.Tensor) -> torch.Tensor:
        """Weight rows `[n0, n1)` (multiples of 64) as `(q - 8) * s + z` in buffer's dtype, into `buffer [n1-n0, K]`."""
        rows, k, g = n1 - n0, config.in_features, config.scheme.group_size
        codes = unpack_blocked64(packed[n0:n1], scratch(rows, k, torch.uint8))
        grouped = buffer.view(rows, k // g, g)
        grouped.copy_(codes.view(rows, k // g, g))
        grouped.sub_(8).mul_(scale_zeros[:, n0:n1, 0].t().unsqueeze(-1))
        if not config.scheme.symmetric:
            grouped.add_(scale_zeros[:, n0:n1, 1].t().unsqueeze(-1))
        return buffer
