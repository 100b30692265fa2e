"""CPU kernels (PyTorch's weight-only int8 / int4 kernels after a repack) against the reference, and dispatch."""

import pytest
import torch

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.kernels import ops
from nanoq_plugin.kernels.base import LinearConfig
from nanoq_plugin.kernels.cpu_dense import DENSE_MIN_ROWS, INT4_DENSE_MIN_ROWS
from nanoq_plugin.kernels.dispatch import select_kernel
from nanoq_plugin.quantizers.codebook import quantize_codebook

from cpu_expectations import expected_cpu_kernel, prepare_with_kernel, skip_unless_hardware_has
from schemes_under_test import SCHEMES, TOLERANCE, rel_error, stored_and_reference


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [208, 256])  # 256: whole 64-row blocks, so the 4-bit expanded path runs too
def test_prepared_cpu_kernel_matches_reference(name, dtype, n):
    k = 384 if "g128" in name else 192
    scheme, tensors, weight = stored_and_reference(name, n, k, 3)
    prepared = ops.prepare_linear(tensors, scheme, n, k, dtype, "cpu")
    assert prepared.kernel == expected_cpu_kernel(scheme, dtype)
    bias = torch.randn(n)
    for rows in (1, DENSE_MIN_ROWS - 1, DENSE_MIN_ROWS, INT4_DENSE_MIN_ROWS - 1, INT4_DENSE_MIN_ROWS):
        x = torch.randn(rows, 1, k).to(dtype)
        out = ops.apply_linear(x, prepared, bias)
        assert out.shape == (rows, 1, n) and out.dtype == dtype
        assert rel_error(out, x.float() @ weight.t() + bias) <= TOLERANCE[dtype], rows
    direct = ops.quantized_linear(x, tensors, scheme, bias)
    assert rel_error(direct, x.float() @ weight.t() + bias) <= TOLERANCE[dtype]


def test_int4_kernel_needs_n_multiple_of_16_and_falls_back():
    scheme, tensors, weight = stored_and_reference("int4g128", 200, 256, 5)
    prepared = ops.prepare_linear(tensors, scheme, 200, 256, torch.bfloat16, "cpu")
    assert prepared.kernel == "reference"
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert rel_error(ops.apply_linear(x, prepared), x.float() @ weight.t()) <= 1e-2


def test_int8_table_rows_from_pytorchs_int8_kernel(cpu_cap):
    scheme, tensors, weight = stored_and_reference("int8", 160, 64, 9)
    prepared = prepare_with_kernel("cpu_int8pack", tensors, scheme, 160, 64, torch.float16, cpu_cap)
    assert set(prepared.tensors) == {"weight_nk", "scales"}
    ids = torch.tensor([[3, 159], [0, 3]])
    rows = ops.gather_embedding(ids, prepared, torch.float32)
    torch.testing.assert_close(rows, weight[ids], rtol=1e-2, atol=1e-3)


def test_int4_tables_use_a_kernel_that_can_gather():
    scheme, tensors, weight = stored_and_reference("int4g64", 160, 128, 9)
    prepared = ops.prepare_linear(tensors, scheme, 160, 128, torch.bfloat16, "cpu", is_embedding=True)
    assert prepared.kernel == "reference"
    ids = torch.tensor([7, 0, 159])
    torch.testing.assert_close(ops.gather_embedding(ids, prepared, torch.float32), weight[ids], rtol=0, atol=0)
    torch.testing.assert_close(ops.quantized_embedding(ids, tensors, scheme, 128, torch.float32), weight[ids])


def test_no_kernel_for_float_lists_every_reason():
    config = LinearConfig(parse_scheme("float"), 16, 32, torch.float32, "cpu")
    with pytest.raises(NanoqError,
                       match=r"model.x: no kernel runs scheme float on cpu \(cpu_int8_vnni: .*cpu_int8pack: .*"
                             r"reference: "):
        select_kernel(config, where="model.x")


def test_reference_ops_pass_opcheck():
    from nanoq_plugin.kernels.custom_ops import embedding, int8_dynamic_linear, op_tensors, reference_linear

    scheme, tensors, weight = stored_and_reference("int3g64-asym", 48, 128, 1)
    x = torch.randn(2, 128)
    args = (x, op_tensors(tensors, scheme), scheme.name, 48)
    torch.library.opcheck(reference_linear, args, test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(reference_linear(*args), x @ weight.t())
    ids = torch.tensor([[1, 2, 47]])
    torch.library.opcheck(embedding, (ids, op_tensors(tensors, scheme), scheme.name, 128, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    _, int8_tensors, _ = stored_and_reference("int8", 48, 128, 2)
    torch.library.opcheck(int8_dynamic_linear, (x, int8_tensors["qweight"], int8_tensors["scales"]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name, n, chunk_rows, dtype", [("int8", 208, 50, torch.float16),
                                                        ("int4g64-asym", 320, 100, torch.bfloat16)])
def test_weights_larger_than_the_scratch_buffer_are_done_in_row_chunks(monkeypatch, cpu_cap, name, n, chunk_rows,
                                                                        dtype):
    """PyTorch's kernels' expanded path (cpu_dense.chunked_matmul), whichever kernel this CPU would choose."""
    from nanoq_plugin.kernels import cpu_dense

    scheme, tensors, weight = stored_and_reference(name, n, 192, 7)
    kernel = "cpu_int8pack" if name == "int8" else "cpu_int4pack"
    prepared = prepare_with_kernel(kernel, tensors, scheme, n, 192, dtype, cpu_cap)
    x = torch.randn(INT4_DENSE_MIN_ROWS + 3, 192, dtype=dtype)
    whole = ops.apply_linear(x, prepared)
    # int8: chunks of 50 rows, the last of 8; int4: 100 rounded down to whole 64-row blocks, the last of 64
    monkeypatch.setattr(cpu_dense, "SCRATCH_ELEMENTS", chunk_rows * 192)
    chunked = ops.apply_linear(x, prepared)
    assert torch.equal(chunked, whole)
    assert rel_error(chunked, x.float() @ weight.t()) <= TOLERANCE[torch.bfloat16]


def test_the_4bit_unpack_reads_this_cpus_packed_layout():
    from nanoq_plugin.kernels.cpu_int4 import blocked64_layout, unpack_blocked64

    if not blocked64_layout():
        pytest.skip("this CPU's int4 packing is not the AVX-512 blocked layout: the per-row kernel runs at every size")
    codes = torch.randint(0, 16, (192, 320), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_blocked64(packed, torch.empty(192, 320, dtype=torch.uint8)).to(torch.int32), codes)
    assert torch.equal(unpack_blocked64(packed[64:128], torch.empty(64, 320, dtype=torch.uint8)).to(torch.int32),
                       codes[64:128])  # a chunk of whole blocks unpacks on its own


def fused_codebook_parts(name: str, part_sizes: list[int], in_features: int):
    """Stored tensors of a fused engine layer (q/k/v-like) whose parts are codebook modules quantized one by one
    (so each has its own table): columns concatenated, tables stacked `[parts, 2**b]`; and the parts' weights."""
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(11)
    stored, weights = [], []
    for size in part_sizes:
        weight = torch.randn(size, in_features, generator=generator) * torch.rand(1, generator=generator)
        tensors = quantize_codebook(weight, scheme)
        stored.append(tensors)
        weights.append(dequantize(tensors, scheme, size, in_features))
    fused = {"qweight": torch.cat([t["qweight"] for t in stored], 1), "scales": torch.cat([t["scales"] for t in stored], 1),
             "codebook": torch.stack([t["codebook"] for t in stored]), "signs": stored[0]["signs"]}
    return scheme, fused, torch.cat(weights)


@pytest.mark.parametrize("name", ["cb2g64", "cb3g128", "cb4g32"])
def test_fused_codebook_parts_with_their_own_tables(name):
    part_sizes, k = [96, 32, 32], 256
    scheme, fused, weight = fused_codebook_parts(name, part_sizes, k)
    assert not torch.equal(fused["codebook"][0], fused["codebook"][1])
    prepared = ops.prepare_linear(fused, scheme, sum(part_sizes), k, torch.bfloat16, "cpu", part_sizes=part_sizes)
    assert isinstance(prepared, ops.PreparedParts) and len(prepared.parts) == 3
    assert all(part.config.rotated_inputs for part in prepared.parts)
    assert "signs" in prepared.tensors and "part2_scales" in prepared.tensors
    bias = torch.randn(sum(part_sizes))
    for rows in (1, 17):
        x = torch.randn(rows, k)
        out = ops.apply_linear(x.to(torch.bfloat16), prepared, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, sum(part_sizes))
        assert rel_error(out, x @ weight.t() + bias) <= TOLERANCE[torch.bfloat16]
        exact = ops.apply_linear(x, ops.prepare_linear(fused, scheme, sum(part_sizes), k, torch.float32, "cpu",
                                                        part_sizes=part_sizes))
        assert rel_error(exact, x @ weight.t()) <= TOLERANCE[torch.float32]


def test_fused_codebook_parts_with_one_table_are_one_linear():
    scheme, fused, weight = fused_codebook_parts("cb3g64", [64, 64], 128)
    fused["codebook"] = fused["codebook"][:1].expand(2, -1)  # the parts' tables are equal
    weight = dequantize({**fused, "codebook": fused["codebook"][0]}, scheme, 128, 128)
    prepared = ops.prepare_linear(fused, scheme, 128, 128, torch.float32, "cpu", part_sizes=[64, 64])
    assert isinstance(prepared, ops.PreparedLinear)
    x = torch.randn(3, 128)
    assert rel_error(ops.apply_linear(x, prepared), x @ weight.t()) <= 1e-5


def test_fused_codebook_tables_need_the_part_sizes():
    scheme, fused, _ = fused_codebook_parts("cb2g64", [64, 64], 128)
    with pytest.raises(NanoqError, match=r"model.qkv_proj: 2 tables of 'codebook' need the output widths of as many parts"):
        ops.prepare_linear(fused, scheme, 128, 128, torch.float32, "cpu", where="model.qkv_proj", part_sizes=[128])


@pytest.fixture(params=["avx512", "avx2"])
def codebook_isa(request, cpu_cap):
    """Each build of the codebook kernel this CPU really runs, whatever the dispatcher prefers (the AVX2 build on
    an AVX-512 machine too) and whatever `NANOQ_CPU_ISA` caps (lifted for the test); skipped, saying why, where
    the CPU lacks the ISA or the build fails."""
    from nanoq_plugin.kernels.cpu_codebook import load_extension

    isa = request.param
    skip_unless_hardware_has("cpu_codebook" if isa == "avx512" else f"cpu_codebook_{isa}")
    cpu_cap(None)
    why = load_extension(isa)
    if why:
        pytest.skip(why)
    return isa


@pytest.mark.parametrize("name", ["cb2g64", "cb3g128", "cb4g32", "cb4g128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cpu_codebook_kernel_matches_reference(name, dtype, codebook_isa):
    """Each ISA's table-lookup kernel (built on first use) against the reference dequantization, on both of its
    paths: direct up to DENSE_MIN_ROWS rows (1-4 rows per pass), expanded rows and oneDNN's GEMM from there;
    tables of 8 levels (2-3 bits: one permute on AVX2) and of 16."""
    from nanoq_plugin.kernels.cpu_codebook import CpuCodebookKernel

    n, k = 208, 384
    scheme = parse_scheme(name)
    tensors = quantize_codebook(torch.randn(n, k, generator=torch.Generator().manual_seed(4)), scheme)
    weight = dequantize(tensors, scheme, n, k)
    kernel, config = CpuCodebookKernel(codebook_isa), LinearConfig(scheme, n, k, dtype, "cpu")
    assert kernel.can_implement(config) == (True, "")
    prepared = kernel.prepare(tensors, config)
    assert prepared["table"].shape == (8 if scheme.bits <= 3 else 16,)
    bias = torch.randn(n)
    for rows in (1, 2, 3, 4, 5, 8, DENSE_MIN_ROWS - 1, DENSE_MIN_ROWS, DENSE_MIN_ROWS + 1, 70):
        x = torch.randn(rows, 1, k).to(dtype)
        out = kernel.apply(x, prepared, config) + bias.to(dtype)
        assert out.shape == (rows, 1, n) and out.dtype == dtype
        assert rel_error(out, x.float() @ weight.t() + bias) <= TOLERANCE[dtype], rows


def test_cpu_codebook_repack_puts_inputs_k_and_k_plus_16_in_one_byte():
    from nanoq_plugin.format.packing import pack_codes
    from nanoq_plugin.kernels.cpu_codebook import repack_codes

    codes = torch.randint(0, 8, (64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)  # [K, N]
    repacked = repack_codes(pack_codes(codes, 3), 3)
    assert repacked.shape == (3, 32) and repacked.dtype == torch.uint8
    for n in range(3):
        for block in range(2):
            for j in range(16):
                byte = repacked[n, block * 16 + j].item()
                assert byte & 15 == codes[block * 32 + j, n] and byte >> 4 == codes[block * 32 + 16 + j, n]


@pytest.mark.parametrize("name", ["cb2g64", "cb4g64"])
def test_cpu_codebook_op_passes_opcheck(name, codebook_isa):
    from nanoq_plugin.kernels.cpu_codebook import NO_SIGNS, OPS, CpuCodebookKernel

    scheme = parse_scheme(name)
    config = LinearConfig(scheme, 32, 128, torch.float32, "cpu")
    tensors = CpuCodebookKernel(codebook_isa).prepare(quantize_codebook(torch.randn(32, 128), scheme), config)
    op = getattr(torch.ops.nano_cpu, OPS[codebook_isa]).default
    for rows, signs in ((3, tensors["signs"]), (20, tensors["signs"]), (3, NO_SIGNS)):
        torch.library.opcheck(op, (torch.randn(rows, 128), signs, tensors["codes"], tensors["scales"], tensors["table"],
                                   64, 12, 1 << 22, True), test_utils=("test_schema", "test_faketensor"))


def test_cpu_codebook_weights_larger_than_one_chunk_are_done_in_row_chunks(codebook_isa):
    from nanoq_plugin.kernels.cpu_codebook import OPS, CpuCodebookKernel

    scheme = parse_scheme("cb3g64")
    tensors = quantize_codebook(torch.randn(208, 128, generator=torch.Generator().manual_seed(5)), scheme)
    prepared = CpuCodebookKernel(codebook_isa).prepare(tensors, LinearConfig(scheme, 208, 128, torch.bfloat16, "cpu"))
    x = torch.randn(20, 128, dtype=torch.bfloat16)
    args = (x, prepared["signs"], prepared["codes"], prepared["scales"], prepared["table"], 64, 12)
    op = getattr(torch.ops.nano_cpu, OPS[codebook_isa])
    weight = dequantize(tensors, scheme, 208, 128)
    for bf16_gemm in (True, False):  # the dense path in bfloat16 (native bf16 CPUs) or float32 (the others)
        whole = op(*args, 1 << 22, bf16_gemm)
        chunked = op(*args, 50 * 128, bf16_gemm)  # chunks of 50 rows, the last of 8
        # a BLAS may block a 50-column GEMM differently from a 208-column one: equal up to one bf16 rounding
        torch.testing.assert_close(chunked, whole, rtol=2**-7, atol=2**-7)
        assert rel_error(whole, x.float() @ weight.t()) <= TOLERANCE[torch.bfloat16]
