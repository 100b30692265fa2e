"""int8 per-channel linears on x86 CPUs: our C++ ops (`csrc/int8_linear_*.cpp`), built on first use.

Three kernels, one op per layer, each chosen by what `cpu_isa.cpu_features()` says the CPU has:

- `CpuInt8DynamicKernel`, scheme int8-a8 (AVX-512 VNNI): the input quantized per token (format.activations,
  the spec), then int8 x int8 with `vpdpbusd` (64 multiply-adds per instruction, twice bfloat16's 32): what
  lets an int8 x int8 layer beat any weight-only kernel once the batch makes the GEMM compute-bound.
  Bit-exact to the spec. Its GEMM driver (register tiles, K chunks that keep a weight panel in L1, threads
  over blocks of 64 outputs) is shared with the next kernel.
- `CpuInt8Bf16Kernel`, weight-only int8 with bfloat16 activations (AVX-512 BF16): each chunk of the
  weight is converted to bfloat16 once per call into an L1 buffer (exact: |q| <= 127) and multiplied with
  `vdpbf16ps`, float32 sums, channel scales on the sums. Replaces PyTorch's `_weight_int8pack_mm` (a fixed
  cost per activation row) and the bf16 expansion for oneDNN where it runs; float16 / float32 activations keep
  `cpu_int8`.
- `CpuInt8DynamicAvx2Kernel`, scheme int8-a8 on AVX2 (and AVX-512 without VNNI): `vpmaddubsw` on |x_q|
  and the weights with x_q's sign, `vpmaddwd` into int32 (`csrc/int8_linear_avx2.cpp` says why the sign
  moves). Bit-exact to the spec. Same weight layout as the VNNI kernel.

The weight is repacked once after loading into blocks of 16 outputs x `depth` inputs (`pack_weight`); embedding
rows are read back from the same blocks (`gather_packed_rows`), so a tied table is held once.
"""

from __future__ import annotations

import torch

from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_extension import build_cpu_extension, missing_isa
from .cpu_grouped import RowOp

LANES = 16  # outputs per register
DYNAMIC_DEPTH, BF16_DEPTH = 4, 2  # inputs per 32-bit lane of vpdpbusd / vdpbf16ps
BUILD_FLAGS = ("-mavx512vnni", "-mavx512bf16")  # beside cpu_extension.ISA_FLAGS["avx512"]


def _outputs(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The `[M, N]` output of an op on `x [M, K]` and `packed [N/16, ...]`, for torch.compile's fake tensors."""
    return x.new_empty((x.shape[0], packed.shape[0] * LANES))


def load_extension() -> str:
    """Build (once per machine) and load the AVX-512 `nano_cpu::int8_*` ops; '' on success, else why not.

    Each kernel checks the instructions its op runs (VNNI or BF16) before calling it."""
    return build_cpu_extension("nanoq_cpu_int8", "int8_linear_avx512.cpp", "avx512", BUILD_FLAGS, fakes={
        "int8_dynamic_linear": lambda x, packed, weight_sums, scales: _outputs(x, packed),
        "int8_weight_only_linear": lambda x, packed, scales: _outputs(x, packed)})


def load_avx2_extension() -> str:
    """Build (once per machine) and load `nano_cpu::int8_dynamic_linear_avx2`; '' on success, else why not."""
    return build_cpu_extension("nanoq_cpu_int8_avx2", "int8_linear_avx2.cpp", "avx2", fakes={
        "int8_dynamic_linear_avx2": lambda x, packed, scales: _outputs(x, packed)})


LOADERS = {"avx512": load_extension, "avx2": load_avx2_extension}


def pack_weight(qweight: torch.Tensor, depth: int) -> torch.Tensor:
    """qweight int8 `[K, N]` -> int8 `[N/16, K/depth, 16, depth]`: `[b, j, l, d]` is `q[depth*j + d, 16*b + l]`."""
    k, n = qweight.shape
    return qweight.t().reshape(n // LANES, LANES, k // depth, depth).permute(0, 2, 1, 3).contiguous()


def gather_packed_rows(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Embedding rows `ids [...]` of a table packed by `pack_weight` (`[N, K]` = `[vocab, hidden]`, scales
    float32 `[N]`) -> `[..., K]` in `dtype`. A lookup is not a product: the rows are the weight-only ones."""
    rows = packed[torch.div(ids, LANES, rounding_mode="floor"), :, ids % LANES, :]  # [..., K/depth, depth]
    return rows.reshape(*ids.shape, in_features).to(dtype) * scales[ids].to(dtype).unsqueeze(-1)


class PackedInt8Kernel:
    """What the three kernels share: which layers they take, the repack, the call and table rows (class
    attributes say the rest)."""

    supports_gather = True
    quantizes_activations: bool
    depth: int
    act_dtypes: tuple[torch.dtype, ...]
    needs: str  # the cpu_isa.CpuFeatures instruction set the op runs (avx512_vnni, avx512_bf16, avx2)
    library: str  # its library: a key of LOADERS
    op: str  # its `nano_cpu::` op
    with_weight_sums: bool  # the op takes the weights' column sums (the VNNI kernel's +128 offset)

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        scheme = config.scheme
        if scheme.kind is not SchemeKind.INT8_CHANNEL or scheme.quantizes_activations != self.quantizes_activations:
            needs = "int8 activations (int8-a8)" if self.quantizes_activations else "weight-only int8 per channel"
            return False, f"needs {needs} (scheme {scheme.name})"
        if config.act_dtype not in self.act_dtypes:
            return False, f"activation dtype {config.act_dtype} is not one of {self.act_dtypes}"
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if config.out_features % LANES or config.in_features % self.depth:
            return False, (f"needs output features a multiple of {LANES} and input features a multiple of "
                           f"{self.depth} (layer {config.out_features}x{config.in_features})")
        why = missing_isa(self.needs) or LOADERS[self.library]()
        return (False, why) if why else (True, "")

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight int8 `[K, N]`, scales `[N]` -> packed int8 `[N/16, K/depth, 16, depth]`, scales float32 `[N]`,
        and for the VNNI op weight_sums int32 `[N]` (the +128 offset's correction)."""
        qweight = tensors["qweight"]
        prepared = {"packed": pack_weight(qweight, self.depth)}
        if self.with_weight_sums:
            prepared["weight_sums"] = qweight.sum(dim=0, dtype=torch.int32).contiguous()
        prepared["scales"] = tensors["scales"].to(torch.float32).contiguous()
        return prepared

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype: `nano_cpu::<op>(x, packed[, weight_sums], scales)`."""
        flat = x.reshape(-1, config.in_features).contiguous()
        names = ("packed", "weight_sums", "scales") if self.with_weight_sums else ("packed", "scales")
        out = getattr(torch.ops.nano_cpu, self.op)(flat, *(prepared[name] for name in names))
        return out.view(*x.shape[:-1], config.out_features)

    def row_op(self, prepared: dict[str, torch.Tensor], config: LinearConfig, x_dtype: torch.dtype,
               rows: int) -> RowOp:
        """The one op `apply` runs, at every size (cpu_grouped)."""
        names = ("packed", "weight_sums", "scales") if self.with_weight_sums else ("packed", "scales")
        return RowOp(f"nano_cpu::{self.op}", tuple(prepared[name] for name in names))

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        return gather_packed_rows(ids, prepared["packed"], prepared["scales"], config.in_features, dtype)


class CpuInt8DynamicKernel(PackedInt8Kernel):
    """`x @ W.T` for int8-a8: per-token int8 activations times per-channel int8 weights (AVX-512 VNNI)."""

    name, op = "cpu_int8_vnni", "int8_dynamic_linear"
    quantizes_activations, depth, with_weight_sums = True, DYNAMIC_DEPTH, True
    act_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    needs, library = "avx512_vnni", "avx512"


class CpuInt8Bf16Kernel(PackedInt8Kernel):
    """`x @ W.T` for weight-only int8 per channel with bfloat16 activations: bfloat16 dot products."""

    name, op = "cpu_int8_bf16dot", "int8_weight_only_linear"
    quantizes_activations, depth, with_weight_sums = False, BF16_DEPTH, False
    act_dtypes = (torch.bfloat16,)
    needs, library = "avx512_bf16", "avx512"


class CpuInt8DynamicAvx2Kernel(PackedInt8Kernel):
    """`x @ W.T` for int8-a8 on AVX2: per-token int8 activations times per-channel int8 weights."""

    name, op = "cpu_int8_avx2", "int8_dynamic_linear_avx2"
    quantizes_activations, depth, with_weight_sums = True, DYNAMIC_DEPTH, False
    act_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    needs, library = "avx2", "avx2"
