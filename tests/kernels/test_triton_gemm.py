"""The fused Triton dequantize-GEMM against the reference: in the interpreter (TRITON_INTERPRET=1, CI), or
compiled on a GPU with `NANOQ_TRITON_DEVICE=cuda` (schemes_under_test.TRITON_DEVICE)."""

import zlib

import pytest
import torch

pytest.importorskip("triton")

from nanoq_plugin.kernels import triton_gemm  # noqa: E402
from nanoq_plugin.kernels.custom_ops import op_tensors, triton_linear, triton_weight_format  # noqa: E402

from schemes_under_test import SCHEMES, TOLERANCE, TRITON_DEVICE, rel_error, stored_and_reference  # noqa: E402

DEVICE = TRITON_DEVICE

# (M, N, K): M and N straddle the 16/64-wide tiles; K = 96 and 160 are not multiples of 64 or 128
SHAPES = [(1, 200, 384), (5, 48, 96), (33, 72, 160)]
CONFIGS = [
    triton_gemm.TileConfig(16, 64, 64, 1),  # decode, one K slice
    triton_gemm.TileConfig(16, 32, 128, 3),  # decode, split-K with a ragged last slice
    triton_gemm.TileConfig(32, 64, 32, 1),  # prefill-style tile
    triton_gemm.TileConfig(16, 64, 64, 1, swap_ab=True),  # weight-first decode tile, one K slice
    triton_gemm.TileConfig(16, 32, 128, 3, swap_ab=True),  # weight-first, split-K with a ragged last slice
    triton_gemm.DEQUANTIZE_THEN_GEMM,  # dequantize the whole weight, then torch.matmul
]


def _fmt(scheme, tensors):
    return triton_weight_format(scheme, tensors)[0]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_matches_reference_and_writes_every_element(name, dtype):
    for shape_index, (m, n, k) in enumerate(SHAPES):
        if k % 32 or (name.split("g")[-1].split("-")[0].isdigit() and k % int(name.split("g")[-1].split("-")[0])):
            continue
        seed = zlib.crc32(f"{name}-{m}-{n}-{k}".encode())
        scheme, tensors, weight = stored_and_reference(name, n, k, seed, DEVICE)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
        ref = x.float() @ weight.t()
        fmt = _fmt(scheme, tensors)
        for config in CONFIGS:
            split_k, _ = triton_gemm.split_k_of(m, k, config)
            out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
            partials = torch.full((split_k, m, n), float("nan"), device=DEVICE)
            triton_gemm.launch(x, tensors["qweight"], tensors["scales"], tensors.get("zeros"), fmt, n, config,
                               out=out, partials=partials)
            assert not out.isnan().any(), f"{name} {config}: output elements left unwritten"
            err = rel_error(out, ref)
            assert err <= TOLERANCE[dtype], f"{name} M={m} N={n} K={k} {config}: rel error {err:.2e}"


@pytest.mark.parametrize("name", ["int4g128", "int3g64-asym", "int8"])
def test_custom_op_on_3d_input_and_fake_impl(name):
    n, k = 80, 256
    scheme, tensors, weight = stored_and_reference(name, n, k, 7, DEVICE)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16, device=DEVICE)
    args = (x, op_tensors(tensors, scheme), scheme.name, n)
    out = triton_linear(*args)
    assert out.shape == (2, 3, n) and out.dtype == torch.bfloat16
    assert rel_error(out, x.float() @ weight.t()) <= 1e-2
    torch.library.opcheck(triton_linear, args, test_utils=("test_schema", "test_faketensor"))


def test_only_the_interpreter_widens_16bit_dots():
    """On a GPU the kernel feeds bf16/fp16 tiles to tl.dot; only the interpreter widens them to float32."""
    for dtype in (torch.bfloat16, torch.float16):
        assert triton_gemm.dot_in_float32(dtype, interpret=False) is False
        assert triton_gemm.dot_in_float32(dtype, interpret=True) is True
    assert triton_gemm.dot_in_float32(torch.float32, interpret=True) is False
    assert triton_gemm.interpreting() is (DEVICE == "cpu")


def test_candidate_configs_are_clamped_and_bucketed():
    assert [triton_gemm.m_bucket(m) for m in (1, 3, 16, 64, 65, 5000)] == [1, 4, 16, 64, 128, 4096]
    small = triton_gemm.candidate_configs(4, 48, 96)
    assert all(c.block_n <= 64 and c.block_k <= 128 and c.block_m == 16 for c in small)
    assert len(small) == len(set(small))
    assert all(c.split_k == 1 for c in triton_gemm.candidate_configs(2048, 4096, 4096))


@pytest.mark.parametrize("name", ["cb2g64", "cb3g32", "cb4g128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_codebook_kernel_on_rotated_inputs_matches_the_reference(name, dtype):
    from nanoq_plugin.format.hadamard import rotate_inputs
    from nanoq_plugin.format.reference import dequantize
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.quantizers.codebook import quantize_codebook

    scheme = parse_scheme(name)
    for m, n, k in [(1, 200, 384), (33, 72, 256)]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}-{m}".encode()))
        tensors = quantize_codebook(torch.randn(n, k, generator=generator), scheme)
        weight = dequantize(tensors, scheme, n, k).to(DEVICE)
        tensors = {key: t.to(DEVICE) for key, t in tensors.items()}
        x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
        ref = x.float() @ weight.t()
        rotated = rotate_inputs(x, tensors["signs"], scheme.group_size)
        fmt = _fmt(scheme, tensors)
        for config in CONFIGS:
            split_k, _ = triton_gemm.split_k_of(m, k, config)
            out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
            partials = torch.full((split_k, m, n), float("nan"), device=DEVICE)
            triton_gemm.launch(rotated, tensors["qweight"], tensors["scales"], tensors["codebook"], fmt, n, config,
                               out=out, partials=partials)
            assert not out.isnan().any()
            err = rel_error(out, ref)
            assert err <= 2 * TOLERANCE[dtype], f"{name} M={m} {config}: rel error {err:.2e}"
