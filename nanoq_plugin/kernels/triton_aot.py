"""Compile the Triton kernels for a GPU target on a machine without one (Triton ships its own `ptxas`).

Triton's CPU interpreter, which the tests run the kernels in, executes the Python body of a kernel and so
misses what only the compiler checks (which globals a kernel may read, types, shared memory per block).
This module compiles every weight format with a decode and a prefill tile, the whole-weight dequantizer
and the embedding gather, and every candidate tile with one format, to a cubin for `--arch` (default 90:
H100 / H200), and reports each variant's shared memory and matrix instructions; likewise the grouped MoE
kernel (triton_moe) in its two launches, w13 ("moe-w13") and w2 with the routing weights ("moe-w2"), for every
format it serves.

    python -m nanoq_plugin.kernels.triton_aot            # a table; exit 1 if any variant fails
    python -m nanoq_plugin.kernels.triton_aot --json     # the same as JSON (tests/kernels/test_triton_aot.py)

It must run without `TRITON_INTERPRET` (under the interpreter `@triton.jit` makes no compilable function).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from .triton_dequant import FMT_CODEBOOK, FMT_INT8_CHANNEL, FMT_INT_GROUP

# Hopper's largest shared memory per block (227 KiB); a tile above it can never launch there.
HOPPER_MAX_SHARED = 232448
_POINTER_TYPE = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_DTYPE_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIGNED_INTS = ("N", "K", "H", "stride_xm", "stride_om", "stride_osplit", "stride_q", "stride_s", "k_per_split",
                 "stride_am", "stride_qe", "stride_se")
# (label, format, bits, group size, has zeros) of every weight format the kernels read
FORMATS = (
    ("int8", FMT_INT8_CHANNEL, 8, 0, False),
    ("int8g128", FMT_INT_GROUP, 8, 128, False),
    ("int4g128", FMT_INT_GROUP, 4, 128, False),
    ("int4g64-asym", FMT_INT_GROUP, 4, 64, True),
    ("int3g128", FMT_INT_GROUP, 3, 128, False),
    ("int3g64-asym", FMT_INT_GROUP, 3, 64, True),
    ("int2g64", FMT_INT_GROUP, 2, 64, False),
    ("cb2g64", FMT_CODEBOOK, 2, 64, False),
    ("cb3g128", FMT_CODEBOOK, 3, 128, False),
    ("cb4g128", FMT_CODEBOOK, 4, 128, False),
)
# the formats the grouped MoE kernel serves (triton_moe.unsupported_reason: no codebooks)
MOE_FORMATS = tuple(label for label, fmt, *_ in FORMATS if fmt != FMT_CODEBOOK)
MOE_TOP_K = 8  # the w13 launch's rows per token (Qwen3-MoE's top-k); only an index divisor in the kernel


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: `kernel` "gemm" (a TileConfig as block_m/n/k, split_k, warps, stages), "dequantize"
    (block_k x block_n tiles), "embedding", or "moe-w13" / "moe-w2" (a triton_moe.MoeConfig)."""

    kernel: str
    format: str
    act_dtype: str
    block_m: int = 0
    block_n: int = 0
    block_k: int = 0
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False


def variants() -> list[Variant]:
    """Every format with the first decode (split-K) and prefill tile in bf16; every candidate tile with int4g128;
    float16 and float32 activations once; the embedding gather for every format."""
    from .triton_gemm import DECODE_CONFIGS, PREFILL_CONFIGS

    def gemm(label: str, config, dtype: str = "bf16") -> Variant:
        return Variant("gemm", label, dtype, config.block_m, config.block_n, config.block_k, config.split_k,
                       config.num_warps, config.num_stages, config.swap_ab)

    decode = next(c for c in DECODE_CONFIGS if c.split_k > 1)
    swapped = next(c for c in DECODE_CONFIGS if c.split_k > 1 and c.swap_ab)
    out = [gemm(label, config) for label, *_ in FORMATS for config in (decode, swapped, PREFILL_CONFIGS[0])]
    out += [gemm("int4g128", config) for config in DECODE_CONFIGS + PREFILL_CONFIGS]
    out += [gemm("int4g128", decode, "fp16"), gemm("int4g128", PREFILL_CONFIGS[0], "fp32"),
            gemm("int4g128", swapped, "fp32")]
    out += [Variant("embedding", label, "bf16", block_n=16, block_k=128) for label, *_ in FORMATS]
    out += [Variant("dequantize", label, "bf16", block_n=64, block_k=64) for label, *_ in FORMATS]
    out += moe_variants()
    unique = []
    for variant in out:
        if variant not in unique:
            unique.append(variant)
    return unique


def moe_variants() -> list[Variant]:
    """The grouped MoE kernel: both launches of every format it serves with the decode configuration in bf16,
    every candidate configuration with int4g128, and float16 / float32 activations once."""
    from .triton_moe import MOE_CONFIGS

    def moe(kernel: str, label: str, config, dtype: str = "bf16") -> Variant:
        return Variant(kernel, label, dtype, config.block_m, config.block_n, config.block_k,
                       num_warps=config.num_warps, num_stages=config.num_stages)

    out = [moe(kernel, label, MOE_CONFIGS[0]) for label in MOE_FORMATS for kernel in ("moe-w13", "moe-w2")]
    out += [moe(kernel, "int4g128", config) for config in MOE_CONFIGS for kernel in ("moe-w13", "moe-w2")]
    out += [moe("moe-w13", "int4g128", MOE_CONFIGS[0], "fp16"), moe("moe-w2", "int4g128", MOE_CONFIGS[2], "fp32")]
    return out


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
            for name in inspect.signature(fn.fn).parameters}


def compile_variant(variant: Variant, arch: int = 90) -> dict:
    """Compile one variant for `sm_<arch>`; returns its report (`ok`, `shared` bytes, `mma` instruction family)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_embedding import embedding_gather_kernel
    from .triton_gemm import TileConfig, WeightFormat, dequant_gemm_kernel, dequantize_kernel, kernel_constexprs

    _, fmt, bits, group, has_zeros = next(f for f in FORMATS if f[0] == variant.format)
    weight = WeightFormat(fmt, bits, group, has_zeros)
    act = _DTYPE_NAME[variant.act_dtype]
    third = "*u8" if has_zeros else "*fp32" if fmt == FMT_CODEBOOK else "*fp16"
    pointers = {"qweight_ptr": "*i8" if fmt == FMT_INT8_CHANNEL else "*i32", "scales_ptr": "*fp16",
                "side_ptr": third}
    if variant.kernel == "gemm":
        fn = dequant_gemm_kernel
        config = TileConfig(variant.block_m, variant.block_n, variant.block_k, variant.split_k,
                            variant.num_warps, variant.num_stages, variant.swap_ab)
        constexprs = kernel_constexprs(weight, config, variant.split_k, act, interpret=False)
        pointers.update(x_ptr=_POINTER_TYPE[act], out_ptr="*fp32" if variant.split_k > 1 else _POINTER_TYPE[act])
    elif variant.kernel == "dequantize":
        fn = dequantize_kernel
        constexprs = dict(**weight.constexprs(), BLOCK_K=variant.block_k, BLOCK_N=variant.block_n)
        pointers.update(out_ptr=_POINTER_TYPE[act])
    elif variant.kernel.startswith("moe-"):
        from .triton_moe import MoeConfig, kernel_constexprs as moe_constexprs, moe_dequant_gemm_kernel

        fn = moe_dequant_gemm_kernel
        w13 = variant.kernel == "moe-w13"
        config = MoeConfig(variant.block_m, variant.block_n, variant.block_k, variant.num_warps, variant.num_stages)
        # model-sized N and K (no tile clamped); w13 writes the activation dtype (and gets the scales as its unread
        # routing weights, as fused_moe_nano passes them), w2 float32 rows times float32 routing weights
        constexprs = moe_constexprs(weight, config, 4096, 4096, MOE_TOP_K if w13 else 1, not w13, act,
                                    interpret=False)
        pointers.update(a_ptr=_POINTER_TYPE[act], out_ptr=_POINTER_TYPE[act] if w13 else "*fp32",
                        weights_ptr="*fp16" if w13 else "*fp32", sorted_rows_ptr="*i32", block_experts_ptr="*i32",
                        padded_rows_ptr="*i32")
    else:
        fn = embedding_gather_kernel
        constexprs = dict(**weight.constexprs(), BLOCK_T=variant.block_n, BLOCK_H=variant.block_k)
        pointers.update(ids_ptr="*i64", out_ptr=_POINTER_TYPE[act])
    report = {**asdict(variant), "arch": arch}
    try:
        params = list(inspect.signature(fn.fn).parameters)
        # what a real launch specializes on: 16-byte aligned tensors, and sizes / strides that are multiples
        # of 16 (every model dimension is); M is never specialized (see dequant_gemm_kernel)
        aligned = [name for name in params if name in pointers or name in _ALIGNED_INTS]
        source = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs),
                           constexprs={(params.index(name),): value for name, value in constexprs.items()},
                           attrs={(params.index(name),): [["tt.divisibility", 16]] for name in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as error:  # noqa: BLE001 — the report names the variant and the compiler's message
        while error.__cause__ is not None:  # Triton wraps the failing statement's error once per call level
            error = error.__cause__
        lines = [line.strip() for line in traceback.format_exception_only(type(error), error) if line.strip()]
        return {**report, "ok": False, "error": " | ".join(lines)[-2000:]}
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    # how the dequantized tile reaches shared memory: 2-byte stores (one element each) or 16-byte vectors
    stores = {width: len(re.findall(pattern, ptx)) for width, pattern in
              (("b16", r"st\.shared\.b16\s"), ("v4", r"st\.shared\.v4\."))}
    return {**report, "ok": True, "shared": compiled.metadata.shared, "mma": mma,
            "shared_stores_b16": stores["b16"], "shared_stores_v4": stores["v4"]}


def compile_all(arch: int = 90, workers: int | None = None) -> list[dict]:
    """Reports of every `variants()` entry, compiled in `workers` processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's @triton.jit functions cannot be compiled")
    todo = variants()
    workers = workers or min(len(todo), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_variant, todo, [arch] * len(todo)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reports = compile_all(args.arch, args.workers)
    if args.json:
        print(json.dumps(reports))
    else:
        for r in reports:
            tile = (f"{r['block_m']}x{r['block_n']}x{r['block_k']} split {r['split_k']} "
                    f"w{r['num_warps']} s{r['num_stages']}{' swap' if r['swap_ab'] else ''}")
            state = f"ok  shared {r['shared']:6d} B  {r['mma']}" if r["ok"] else f"FAILED {r['error']}"
            print(f"{r['kernel']:9s} {r['format']:13s} {r['act_dtype']:4s} {tile:28s} {state}")
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
