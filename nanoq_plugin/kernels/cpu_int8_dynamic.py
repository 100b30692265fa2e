"""Scheme int8-a8 on x86 CPUs with AVX-512 VNNI: a C++ kernel (`csrc/int8_vnni_avx512.cpp`) built on first use.

One op per layer (`nano_cpu::int8_dynamic_linear`) quantizes the input per token (format.activations, the
spec) and multiplies int8 by int8 with `vpdpbusd` (64 multiply-adds per instruction, twice the bfloat16 dot
product's 32 on AVX-512 BF16 CPUs): what lets an int8 x int8 layer beat every weight-only kernel once the
batch makes the GEMM compute-bound. The weight is repacked once after loading into 64-byte blocks of 16
outputs x 4 inputs (`pack_weight`); its column sums correct the +128 offset of the unsigned activations.
Embedding rows are read back from the same blocks (`gather_rows`), so a tied table is held once.
"""

from __future__ import annotations

import functools

import torch

from ..format.schemes import SchemeKind
from .base import LinearConfig
from .cpu_extension import build_cpu_extension

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LANES, DEPTH = 16, 4  # outputs per register, inputs per int32 lane of `vpdpbusd`
BUILD_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]


@functools.cache
def load_extension() -> str:
    """Build (once per machine) and load `nano_cpu::int8_dynamic_linear`; '' on success, else why not."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability() or not torch.cpu._is_vnni_supported():
        return "needs AVX-512 with VNNI"
    why = build_cpu_extension("nanoq_cpu_int8_vnni", "int8_vnni_avx512.cpp", BUILD_FLAGS)
    if not why:
        torch.library.register_fake("nano_cpu::int8_dynamic_linear")(_fake_int8_dynamic_linear)
    return why


def pack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int8 `[K, N]` -> int8 `[N/16, K/4, 16, 4]`: element `[b, j, l, d]` is `q[4j + d, 16b + l]`."""
    k, n = qweight.shape
    return qweight.t().reshape(n // LANES, LANES, k // DEPTH, DEPTH).permute(0, 2, 1, 3).contiguous()


class CpuInt8DynamicKernel:
    """`x @ W.T` for int8-a8: per-token int8 activations times per-channel int8 weights, on the CPU."""

    name = "cpu_int8_vnni"
    supports_gather = True

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if config.scheme.kind is not SchemeKind.INT8_CHANNEL or not config.scheme.quantizes_activations:
            return False, f"needs int8 activations (scheme {config.scheme.name})"
        if config.out_features % LANES or config.in_features % DEPTH:
            return False, (f"needs output features a multiple of {LANES} and input features a multiple of {DEPTH} "
                           f"(layer {config.out_features}x{config.in_features})")
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        why = load_extension()
        return (False, why) if why else (True, "")

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """qweight int8 `[K, N]`, scales `[N]` -> packed int8 `[N/16, K/4, 16, 4]`, weight_sums int32 `[N]`,
        scales float32 `[N]`."""
        why = load_extension()
        if why:
            raise RuntimeError(f"{self.name}: {why}")
        qweight = tensors["qweight"]
        return {"packed": pack_weight(qweight),
                "weight_sums": qweight.sum(dim=0, dtype=torch.int32).contiguous(),
                "scales": tensors["scales"].to(torch.float32).contiguous()}

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        flat = x.reshape(-1, config.in_features).contiguous()
        out = torch.ops.nano_cpu.int8_dynamic_linear(flat, prepared["packed"], prepared["weight_sums"],
                                                     prepared["scales"])
        return out.view(*x.shape[:-1], config.out_features)

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows `ids [...]` -> `[..., K]` in `dtype` (the table is `[N, K]` = `[vocab, hidden]`); an
        embedding is a lookup, not a product, so its rows are the weight-only int8 ones."""
        packed = prepared["packed"]
        rows = packed[torch.div(ids, LANES, rounding_mode="floor"), :, ids % LANES, :]  # [..., K/4, 4]
        rows = rows.reshape(*ids.shape, config.in_features).to(dtype)
        return rows * prepared["scales"][ids].to(dtype).unsqueeze(-1)


def _fake_int8_dynamic_linear(x, packed, weight_sums, scales):
    """Shape and dtype of `nano_cpu::int8_dynamic_linear` for torch.compile (the op is opaque to it)."""
    return x.new_empty((x.shape[0], packed.shape[0] * LANES))
