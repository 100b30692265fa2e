"""Codebook schemes on x86 CPUs: a C++ kernel (`csrc/codebook_cpu.cpp`) compiled on first use, once per vector ISA.

The reference dequantizes the whole weight every call (unpack, gather the levels, scale, transpose): on
SmolLM2's gate_proj that is ~10 ms a call on one core, 60x a bf16 GEMM. Here the codes are repacked once
after loading into 4-bit nibbles per output row (`repack_codes`; 2- and 3-bit codes take 4 bits in memory,
as in the int4 kernel), and the table of `2**b` levels sits in registers: a 16-byte load gives 32 codes,
permutes of the table by them give their levels, and fused multiply-adds with the rotated activations
accumulate per group before the group's scale is applied. Below `cpu_dense.DENSE_MIN_ROWS` activation rows the
kernel multiplies directly (four rows per pass over the codes); from there on, `SCRATCH_ELEMENTS` of `W'` at a
time are expanded in bf16 (float32 for other activations) and multiplied by ATen's GEMM. On CPUs without native
bfloat16 dot products a bf16 GEMM is emulated, so the expansion is float32 there and starts at
`FLOAT32_DENSE_MIN_ROWS` (`CpuCodebookKernel.dense_path`). The rotation (a fast Walsh-Hadamard transform per
group) runs in the same C++ call: one op per layer.

The source is built twice, one library and op per ISA (both register into `nano_cpu`):

    CpuCodebookKernel(isa)  name               library                      op
    "avx512"                cpu_codebook       nanoq_cpu_codebook_avx512    nano_cpu::codebook_linear
    "avx2"                  cpu_codebook_avx2  nanoq_cpu_codebook_avx2      nano_cpu::codebook_linear_avx2

AVX-512 holds the 16 levels in one register (one permute per 16 codes); AVX2 (Zen 2/3, Haswell on) in two
registers of 8 (two permutes and a blend per 8 codes; one permute where the scheme has <= 8 levels, told by
the table's size: `prepare` pads the levels to 8 or 16).

Needs a C++ compiler and ninja at first use (the build is cached by torch in `TORCH_EXTENSIONS_DIR`); where
the build fails or the CPU (or the `NANOQ_CPU_ISA` cap, kernels.cpu_isa) lacks the ISA, `can_implement` says
why and the next kernel in the dispatcher's list runs instead.
"""

from __future__ import annotations

import torch

from ..format.packing import unpack_codes
from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_dense import DENSE_MIN_ROWS, FLOAT32_DENSE_MIN_ROWS, SCRATCH_ELEMENTS
from .cpu_extension import build_cpu_extension, missing_isa
from .cpu_isa import cpu_features

BLOCK = 32  # inputs per 16 bytes of repacked codes
TABLE_SIZES = (8, 16)  # levels zero-padded to one AVX2 register (<= 8 levels, one permute) or 16
OPS = {"avx512": "codebook_linear", "avx2": "codebook_linear_avx2"}  # nano_cpu:: op of each build


def load_extension(isa: str = "avx512") -> str:
    """Load the `nano_cpu::` op of `isa` ('avx512' or 'avx2'), building it on first use; '' on success, else
    why not."""
    return build_cpu_extension(f"nanoq_cpu_codebook_{isa}", "codebook_cpu.cpp", isa,
                               fakes={OPS[isa]: _fake_codebook_linear})


def repack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes int32 `[K*b/32, N]` (docs/FORMAT.md) -> uint8 `[N, K/2]`: per row, every block of 32 inputs
    `k0..k0+31` as 16 bytes, byte `j` = `code[k0+j] | code[k0+16+j] << 4` (what the C++ kernel decodes)."""
    codes = unpack_codes(qweight, bits).t()  # [N, K] uint8
    n, k = codes.shape
    blocks = codes.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def level_table(codebook: torch.Tensor) -> torch.Tensor:
    """The scheme's levels `[2**b]` as float32 `[8]` (b <= 3) or `[16]`, zero-padded (what the C++ kernel reads)."""
    size = next(size for size in TABLE_SIZES if codebook.numel() <= size)
    table = torch.zeros(size, dtype=torch.float32)
    table[: codebook.numel()] = codebook.to(torch.float32)
    return table


class CpuCodebookKernel:
    """`x @ W.T` for codebook schemes on the CPU (rotation, then the table-lookup GEMM), built for `isa`."""

    supports_gather = False

    def __init__(self, isa: str = "avx512"):
        if isa not in OPS:
            raise ValueError(f"isa {isa!r} is not one of {', '.join(OPS)}")
        self.isa = isa
        self.name = "cpu_codebook" if isa == "avx512" else f"cpu_codebook_{isa}"

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if config.scheme.kind is not SchemeKind.CODEBOOK:
            return False, f"needs a codebook scheme (scheme {config.scheme.name})"
        why = missing_isa(self.isa) or load_extension(self.isa)
        return (False, why) if why else (True, "")

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight `[K*b/32, N]`, scales `[K/G, N]`, codebook `[2**b]` -> codes uint8 `[N, K/2]`, scales float16
        `[N, K/G]`, table float32 `[8]` or `[16]` (`level_table`); signs `[K]` kept unless the caller rotates."""
        prepared = {"codes": repack_codes(tensors["qweight"], config.scheme.bits),
                    "scales": tensors["scales"].t().contiguous(), "table": level_table(tensors["codebook"])}
        if not config.rotated_inputs:
            prepared["signs"] = tensors["signs"]
        return prepared

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype (rotated here unless `config.rotated_inputs`)."""
        signs = prepared.get("signs", NO_SIGNS)
        op = getattr(torch.ops.nano_cpu, OPS[self.isa])
        out = op(x.reshape(-1, config.in_features), signs, prepared["codes"], prepared["scales"], prepared["table"],
                 config.scheme.group_size, *self.dense_path())
        return out.view(*x.shape[:-1], config.out_features)


    @staticmethod
    def dense_path() -> tuple[int, int, bool]:
        """(rows from which the dense path runs, scratch elements, whether it multiplies in bfloat16): bfloat16
        where the CPU has native bfloat16 dot products, float32 (which overtakes the direct path later) elsewhere."""
        native_bf16 = cpu_features().avx512_bf16
        return (DENSE_MIN_ROWS if native_bf16 else FLOAT32_DENSE_MIN_ROWS), SCRATCH_ELEMENTS, native_bf16


NO_SIGNS = torch.empty(0, dtype=torch.int8)  # `signs` of a part whose caller has rotated x (kernels.ops.PreparedParts)


def _fake_codebook_linear(x, signs, codes, scales, table, group_size, dense_min_rows, chunk_elements, bf16_gemm):
    """Shape and dtype of `nano_cpu::codebook_linear[_avx2]` for torch.compile (the op is opaque to it)."""
    return x.new_empty((x.shape[0], codes.shape[0]))
