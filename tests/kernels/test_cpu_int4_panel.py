"""What the group-wise int4 kernel runs (kernels/cpu_int4.py): our panel op (`nano_cpu::int4pack_linear_avx512bf16`,
on PyTorch's packing) at every row count where the CPU has AVX-512 BF16, else PyTorch's per-row kernel and, from
INT4_DENSE_MIN_ROWS rows on, the expanded dense GEMM — each against the reference dequantize-matmul. The panel runs
where the hardware has AVX-512 BF16 and no cap removes it; under NANOQ_CPU_ISA=none the same kernel must choose
PyTorch's kernel and the dense path, as a CPU without AVX-512 BF16 does, so every choice is tested on every CPU (the
panel's own tests skip, with the reason, where it cannot run)."""

import pytest
import torch

from nanoq_plugin.kernels import ops
from nanoq_plugin.kernels.base import LinearConfig
from nanoq_plugin.kernels.cpu_dense import INT4_DENSE_MIN_ROWS
from nanoq_plugin.kernels.cpu_int4 import Int4Path, blocked64_layout, panel_missing
from nanoq_plugin.kernels.dispatch import KERNELS

from cpu_expectations import prepare_with_kernel
from schemes_under_test import TOLERANCE, rel_error, stored_and_reference

# (scheme, N, K): K = 640 is five chunks of 128 inputs, K = 96 less than one chunk; N = 192 is three 64-output blocks
CASES = [("int4g128", 192, 640), ("int4g64-asym", 128, 384), ("int3g32", 64, 96), ("int2g64", 64, 320),
         ("int4g32-asym", 256, 512)]
ROWS = (1, 2, 3, 5, 6, 7, 13, 24, 25, 64, 100)  # row tiles of 6 (with a remainder), decoded per tile up to 24


def prepared_or_skip(name: str, n: int, k: int, seed: int = 0):
    """(scheme, PyTorch-packed tensors, reference float32 weight [n, k]) for the panel op; skips where it cannot
    run here, with the reason."""
    scheme, tensors, weight = stored_and_reference(name, n, k, seed)
    config = LinearConfig(scheme, n, k, torch.bfloat16, "cpu")
    why = panel_missing(config, torch.bfloat16)
    if why:
        pytest.skip(f"the int4 bfloat16 panel does not run here: {why}")
    return scheme, KERNELS["cpu_int4pack"].prepare(tensors, config), weight


def close_to(out: torch.Tensor, want: torch.Tensor, label) -> None:
    """Within the bfloat16 tolerance overall, and no element far off (a mean hides one bad tile)."""
    assert rel_error(out, want) <= TOLERANCE[torch.bfloat16], label
    assert (out.float() - want).abs().max().item() <= 3 * TOLERANCE[torch.bfloat16] * want.abs().max().item(), label


@pytest.mark.parametrize("name, n, k", CASES)
def test_panel_op_matches_the_reference(uncapped, name, n, k):
    scheme, prepared, weight = prepared_or_skip(name, n, k)
    generator = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        out = torch.ops.nano_cpu.int4pack_linear_avx512bf16(x, prepared["packed"], prepared["scale_zeros"],
                                                           scheme.group_size)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        close_to(out, x.float() @ weight.t(), rows)


@pytest.mark.parametrize("group_size, k", [(256, 768), (96, 192), (32, 64)])
def test_panel_op_computes_pytorchs_format(uncapped, group_size, k):
    """The op on tensors made by hand in PyTorch's format, `W = (q - 8) * s + z` with random q, s and z: a group
    larger than one 128-input chunk (256: two chunks share its scale and zero), one that 128 does not divide (96),
    and one chunk in all (32)."""
    n = 128
    generator = torch.Generator().manual_seed(group_size)
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.int32)
    scale_zeros = (torch.randn(k // group_size, n, 2, generator=generator) * 0.1).to(torch.bfloat16)
    config = LinearConfig(stored_and_reference("int4g128", n, 128, 0)[0], n, k, torch.bfloat16, "cpu")
    why = panel_missing(config, torch.bfloat16)
    if why:
        pytest.skip(f"the int4 bfloat16 panel does not run here: {why}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s, z = (scale_zeros[..., i].float().t().repeat_interleave(group_size, dim=1) for i in (0, 1))  # [n, k]
    weight = (q - 8).float() * s + z
    for rows in (1, 4, 9):
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        out = torch.ops.nano_cpu.int4pack_linear_avx512bf16(x, packed, scale_zeros, group_size)
        close_to(out, x.float() @ weight.t(), (group_size, rows))


def test_panel_op_on_no_rows_and_a_row_of_zeros(uncapped):
    scheme, prepared, _ = prepared_or_skip("int4g128", 64, 256)
    args = (prepared["packed"], prepared["scale_zeros"], scheme.group_size)
    assert torch.ops.nano_cpu.int4pack_linear_avx512bf16(torch.empty(0, 256, dtype=torch.bfloat16), *args).shape == (0, 64)
    assert not torch.ops.nano_cpu.int4pack_linear_avx512bf16(torch.zeros(7, 256, dtype=torch.bfloat16), *args).any()


def test_panel_op_refuses_tensors_that_are_not_its_layout(uncapped):
    scheme, prepared, _ = prepared_or_skip("int4g128", 128, 256)
    packed, scale_zeros = prepared["packed"], prepared["scale_zeros"]
    x = torch.randn(3, 256).to(torch.bfloat16)
    op = torch.ops.nano_cpu.int4pack_linear_avx512bf16
    with pytest.raises(RuntimeError, match=r"x must be a contiguous bfloat16 \[M, K\] matrix, got Half"):
        op(x.half(), packed, scale_zeros, 128)
    with pytest.raises(RuntimeError, match=r"N a multiple of 64 and K = 256, got \[112, 128\]"):
        op(x, packed[:112], scale_zeros, 128)
    with pytest.raises(RuntimeError, match=r"K \(256\) must be a multiple of the group size \(96\)"):
        op(x, packed, scale_zeros, 96)
    with pytest.raises(RuntimeError, match=r"scale_zeros must be contiguous bfloat16 \[K/G, N, 2\] = \[2, 128, 2\], "
                                           r"got Float"):
        op(x, packed, scale_zeros.float(), 128)


def test_panel_op_passes_opcheck(uncapped):
    scheme, prepared, _ = prepared_or_skip("int4g64", 64, 128)
    for rows in (1, 9):
        torch.library.opcheck(torch.ops.nano_cpu.int4pack_linear_avx512bf16.default,
                              (torch.randn(rows, 128, dtype=torch.bfloat16), prepared["packed"],
                               prepared["scale_zeros"], scheme.group_size),
                              test_utils=("test_schema", "test_faketensor"))


def expected_path(rows: int, panel_runs: bool, n: int) -> Int4Path:
    """The module docstring's table of cpu_int4: what runs `rows` rows."""
    if panel_runs:
        return Int4Path.PANEL
    if rows >= INT4_DENSE_MIN_ROWS and n % 64 == 0 and blocked64_layout():
        return Int4Path.DENSE
    return Int4Path.ATEN


@pytest.mark.parametrize("cap", [None, "none"], ids=["native", "capped-none"])
@pytest.mark.parametrize("dtype, n", [(torch.bfloat16, 192), (torch.float16, 192), (torch.bfloat16, 208)],
                         ids=["bf16", "fp16", "bf16-n208"])
def test_apply_chooses_its_op_by_rows_and_matches_the_reference(cpu_cap, cap, dtype, n):
    """Row counts from decode to past the dense threshold, through `apply_linear` (what dense layers run) and `row_op`
    (what the grouped MoE path runs): the op chosen is the table's, and the output the reference's."""
    k = 256
    scheme, tensors, weight = stored_and_reference("int4g128", n, k, 2)
    prepared = prepare_with_kernel("cpu_int4pack", tensors, scheme, n, k, dtype, cpu_cap)
    cpu_cap(cap)
    panel_runs = not panel_missing(prepared.config, dtype)
    if cap == "none" or dtype != torch.bfloat16 or n % 64:
        assert not panel_runs, "the panel needs AVX-512 BF16, bfloat16 activations and whole 64-output blocks"
    kernel = KERNELS["cpu_int4pack"]
    generator = torch.Generator().manual_seed(4)
    for rows in (1, 2, 3, 4, 5, INT4_DENSE_MIN_ROWS - 1, INT4_DENSE_MIN_ROWS, INT4_DENSE_MIN_ROWS + 1):
        want = expected_path(rows, panel_runs, n)
        assert kernel.path_for(rows, prepared.config, dtype) is want, rows
        row_op = kernel.row_op(prepared.tensors, prepared.config, dtype, rows)
        assert (row_op and row_op.op) == {Int4Path.PANEL: "nano_cpu::int4pack_linear_avx512bf16",
                                          Int4Path.ATEN: "aten::_weight_int4pack_mm_for_cpu",
                                          Int4Path.DENSE: None}[want], rows
        x = torch.randn(rows, k, generator=generator).to(dtype)
        out = ops.apply_linear(x, prepared)
        assert out.dtype == dtype and out.shape == (rows, n)
        close_to(out, x.float() @ weight.t(), rows)
