"""Codebook schemes on x86 CPUs with AVX-512: a C++ kernel (`csrc/codebook_avx512.cpp`) compiled on first use.

The reference dequantizes the whole weight every call (unpack, gather the levels, scale, transpose): on
SmolLM2's gate_proj that is ~10 ms a call on one core, 60x a bf16 GEMM. Here the codes are repacked once
after loading into 4-bit nibbles per output row (`repack_codes`; 2- and 3-bit codes take 4 bits in memory,
as in the int4 kernel), and the table of `2**b` levels sits in one AVX-512 register: a 16-byte load gives
32 codes, two permutes give their levels, and fused multiply-adds with the rotated activations accumulate
per group before the group's scale is applied. Up to `cpu_dense.DENSE_MIN_ROWS` activation rows the kernel
multiplies directly (four rows per pass over the codes); from there on, `SCRATCH_ELEMENTS` of `W'` at a time
are expanded in bf16 (float32 for other activations) and multiplied by ATen's GEMM. The rotation (a fast
Walsh-Hadamard transform per group) runs in the same C++ call: one op per layer, `nano_cpu::codebook_linear`.

Needs a C++ compiler and ninja at first use (the build is cached by torch in `TORCH_EXTENSIONS_DIR`); where
the build fails or the CPU has no AVX-512, `can_implement` says why and the reference runs instead.
"""

from __future__ import annotations

import functools

import torch

from ..format.packing import unpack_codes
from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_dense import DENSE_MIN_ROWS, SCRATCH_ELEMENTS
from .cpu_extension import build_cpu_extension

BUILD_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
BLOCK = 32  # inputs per 16 bytes of repacked codes
TABLE_SIZE = 16  # one AVX-512 register of float32 levels


@functools.cache
def load_extension() -> str:
    """Build (once per machine, cached by torch) and load the `nano_cpu::` ops; '' on success, else why not."""
    why = build_cpu_extension("nanoq_cpu_codebook", "codebook_avx512.cpp", BUILD_FLAGS)
    if why:
        return why
    torch.library.register_fake("nano_cpu::codebook_linear")(_fake_codebook_linear)
    return ""


def repack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes int32 `[K*b/32, N]` (docs/FORMAT.md) -> uint8 `[N, K/2]`: per row, every block of 32 inputs
    `k0..k0+31` as 16 bytes, byte `j` = `code[k0+j] | code[k0+16+j] << 4` (what the C++ kernel decodes)."""
    codes = unpack_codes(qweight, bits).t()  # [N, K] uint8
    n, k = codes.shape
    blocks = codes.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class CpuCodebookKernel:
    """`x @ W.T` for codebook schemes on the CPU (rotation, then the table-lookup GEMM)."""

    name = "cpu_codebook"
    supports_gather = False

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if config.scheme.kind is not SchemeKind.CODEBOOK:
            return False, f"needs a codebook scheme (scheme {config.scheme.name})"
        why = load_extension()
        return (False, why) if why else (True, "")

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight `[K*b/32, N]`, scales `[K/G, N]`, codebook `[2**b]` -> codes uint8 `[N, K/2]`, scales float16
        `[N, K/G]`, table float32 `[16]` (levels, zero-padded); signs `[K]` kept unless the caller rotates."""
        table = torch.zeros(TABLE_SIZE, dtype=torch.float32)
        table[: tensors["codebook"].numel()] = tensors["codebook"].to(torch.float32)
        prepared = {"codes": repack_codes(tensors["qweight"], config.scheme.bits),
                    "scales": tensors["scales"].t().contiguous(), "table": table}
        if not config.rotated_inputs:
            prepared["signs"] = tensors["signs"]
        return prepared

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype (rotated here unless `config.rotated_inputs`)."""
        signs = prepared.get("signs", NO_SIGNS)
        out = torch.ops.nano_cpu.codebook_linear(x.reshape(-1, config.in_features), signs, prepared["codes"],
                                                 prepared["scales"], prepared["table"], config.scheme.group_size,
                                                 DENSE_MIN_ROWS, SCRATCH_ELEMENTS)
        return out.view(*x.shape[:-1], config.out_features)


NO_SIGNS = torch.empty(0, dtype=torch.int8)  # `signs` of a part whose caller has rotated x (kernels.ops.PreparedParts)


def _fake_codebook_linear(x, signs, codes, scales, table, group_size, dense_min_rows, chunk_elements):
    """Shape and dtype of `nano_cpu::codebook_linear` for torch.compile (the op is opaque to it)."""
    return x.new_empty((x.shape[0], codes.shape[0]))
