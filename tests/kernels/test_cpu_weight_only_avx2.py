"""The AVX2 weight-only kernels (int8 per channel, int2/3/4 per group; float32 FMAs on a decoded panel) against
the reference, on any x86 CPU with AVX2: under NANOQ_CPU_ISA=avx2 an AVX-512 machine chooses them as an AVX2
one does."""

import pytest
import torch

from nanoq_plugin.kernels import ops

from cpu_expectations import prepare_with_kernel
from schemes_under_test import TOLERANCE, rel_error, stored_and_reference

CASES = [("cpu_int8_wo_avx2", "int8"), ("cpu_int4_avx2", "int4g128"), ("cpu_int4_avx2", "int4g64-asym"),
         ("cpu_int4_avx2", "int3g32"), ("cpu_int4_avx2", "int3g128"), ("cpu_int4_avx2", "int2g64"),
         ("cpu_int4_avx2", "int2g32-asym")]


@pytest.mark.parametrize("kernel_name, name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_matches_the_reference_at_every_row_count(cpu_cap, kernel_name, name, dtype):
    """Rows 1-3 (no panel), 4-7 (one tile and a remainder), 13 and 40; K = 640: two whole chunks of 256 and a
    remainder; N = 208: thirteen blocks of 16 (two threads get uneven shares)."""
    n, k = 208, 640
    scheme, tensors, weight = stored_and_reference(name, n, k, 4)
    prepared = prepare_with_kernel(kernel_name, tensors, scheme, n, k, dtype, cpu_cap)
    generator = torch.Generator().manual_seed(5)
    for rows in (1, 2, 3, 4, 6, 7, 13, 40):
        x = torch.randn(rows, k, generator=generator).to(dtype)
        out = ops.apply_linear(x, prepared)
        assert out.dtype == dtype and out.shape == (rows, n)
        want = x.float() @ weight.t()
        assert rel_error(out, want) <= TOLERANCE[dtype], rows
        # no element far off (a mean hides one bad tile): within 3 ulp-scaled steps of the largest output
        assert (out.float() - want).abs().max().item() <= 3 * TOLERANCE[dtype] * want.abs().max().item(), rows


def test_int8_table_rows_come_back_from_the_blocks(cpu_cap):
    scheme, tensors, weight = stored_and_reference("int8", 160, 64, 6)
    prepared = prepare_with_kernel("cpu_int8_wo_avx2", tensors, scheme, 160, 64, torch.bfloat16, cpu_cap)
    ids = torch.tensor([[3, 159], [0, 17]])
    torch.testing.assert_close(ops.gather_embedding(ids, prepared, torch.float32), weight[ids], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kernel_name, name, op, names", [
    ("cpu_int8_wo_avx2", "int8", "int8_weight_only_linear_avx2", ("packed", "scales")),
    ("cpu_int4_avx2", "int4g32", "int4_linear_avx2", ("packed", "scales", "offsets")),
])
def test_ops_pass_opcheck(cpu_cap, kernel_name, name, op, names):
    scheme, tensors, _ = stored_and_reference(name, 64, 64, 7)
    prepared = prepare_with_kernel(kernel_name, tensors, scheme, 64, 64, torch.bfloat16, cpu_cap).tensors
    extra = (scheme.group_size,) if op == "int4_linear_avx2" else ()
    for rows in (1, 9):
        torch.library.opcheck(getattr(torch.ops.nano_cpu, op).default,
                              (torch.randn(rows, 64, dtype=torch.bfloat16), *(prepared[n] for n in names), *extra),
                              test_utils=("test_schema", "test_faketensor"))


def test_they_step_aside_where_bfloat16_is_native(cpu_cap):
    from nanoq_plugin.kernels.base import LinearConfig
    from nanoq_plugin.kernels.cpu_isa import detect
    from nanoq_plugin.kernels.dispatch import KERNELS

    if not detect().avx512_bf16:
        pytest.skip(f"this CPU has no AVX-512 BF16: {detect().describe()}")
    cpu_cap(None)
    scheme, _, _ = stored_and_reference("int4g128", 64, 128, 8)
    ok, why = KERNELS["cpu_int4_avx2"].can_implement(LinearConfig(scheme, 64, 128, torch.bfloat16, "cpu"))
    assert not ok and "AVX-512 BF16" in why
