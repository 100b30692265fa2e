"""Several weights on consecutive rows of one input in one parallel region (kernels/cpu_grouped.py,
`ops.apply_grouped`): every weight's rows must equal `apply_linear` on them bit for bit, for each kernel with a
single op (PyTorch's int4 kernel, our int8 ones; the AVX2 int4 and int8 kernels, chosen here under
NANOQ_CPU_ISA=avx2 as on an AVX2 machine), and the grouped op must really have run. Row counts straddle the int4
kernel's dense threshold (cpu_int4): where its panel op does not run, weights of INT4_DENSE_MIN_ROWS rows and more
leave the group and run one by one."""

import re

import pytest
import torch

from nanoq_plugin.kernels import cpu_grouped, ops
from nanoq_plugin.kernels.cpu_dense import INT4_DENSE_MIN_ROWS
from nanoq_plugin.kernels.cpu_int4 import panel_missing

from cpu_expectations import prepare_with_kernel
from schemes_under_test import stored_and_reference

CASES = [("cpu_int4pack", "int4g128"), ("cpu_int4pack", "int3g64-asym"), ("cpu_int4_avx2", "int4g128"),
         ("cpu_int4_avx2", "int2g32-asym"), ("cpu_int8_wo_avx2", "int8"), ("cpu_int8_bf16dot", "int8"),
         ("cpu_int8_vnni", "int8-a8"), ("cpu_int8_avx2", "int8-a8")]


@pytest.fixture
def grouped_calls(monkeypatch):
    """The weights each `cpu_grouped.grouped_rows` call of this test ran, in order."""
    calls = []
    real = cpu_grouped.grouped_rows

    def counting(out, x, ranges, row_ops, gather=None):
        calls.append(len(ranges))
        return real(out, x, ranges, row_ops, gather)

    monkeypatch.setattr(cpu_grouped, "grouped_rows", counting)
    return calls


def experts(kernel_name, name, count, n, k, dtype, cpu_cap):
    """`count` random weights [n, k] prepared by `kernel_name`."""
    prepared = []
    for seed in range(count):
        scheme, tensors, _ = stored_and_reference(name, n, k, seed)
        prepared.append(prepare_with_kernel(kernel_name, tensors, scheme, n, k, dtype, cpu_cap))
    return prepared


@pytest.mark.parametrize("kernel_name, name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_grouped_rows_equal_each_weight_alone(cpu_cap, grouped_calls, kernel_name, name, dtype):
    if kernel_name in ("cpu_int4pack", "cpu_int8_bf16dot") and dtype == torch.float32:
        pytest.skip(f"{kernel_name} takes 16-bit activations only")
    n, k = 192, 256
    prepared = experts(kernel_name, name, 7, n, k, dtype, cpu_cap)
    if cpu_grouped.load_extension():
        pytest.skip(f"the grouped op did not build here: {cpu_grouped.load_extension()}")
    generator = torch.Generator().manual_seed(3)
    # decode-like (1-3 rows per weight), then a weight at and one past the int4 dense threshold among small ones
    for counts in ([1, 2, 1, 3, 1, 2, 1], [2, INT4_DENSE_MIN_ROWS, 1, 5, INT4_DENSE_MIN_ROWS + 7, 1, 3]):
        x = torch.randn(sum(counts), k, generator=generator).to(dtype)
        out = ops.apply_grouped(x, counts, prepared)
        assert out.dtype == dtype and out.shape == (sum(counts), n)
        start = 0
        for count, weight in zip(counts, prepared):
            assert torch.equal(out[start:start + count], ops.apply_linear(x[start:start + count], weight)), counts
            start += count
        source = torch.randn(5, k, generator=generator).to(dtype)  # the same rows gathered from a smaller input
        gather = torch.randint(0, 5, (sum(counts),), generator=generator)
        assert torch.equal(ops.apply_grouped(source, counts, prepared, gather),
                           ops.apply_grouped(source[gather], counts, prepared)), counts
    dense_leaves = kernel_name == "cpu_int4pack" and panel_missing(prepared[0].config, dtype)
    assert grouped_calls == ([7, 7, 7, 5, 5, 5] if dense_leaves else [7] * 6), grouped_calls


def test_fewer_weights_than_threads_run_one_by_one(cpu_cap, grouped_calls):
    """Splitting one weight's outputs over the threads beats one thread per weight when there are fewer weights
    than threads (and a lone weight gains nothing from the group)."""
    prepared = experts("cpu_int4pack", "int4g128", 1, 128, 256, torch.bfloat16, cpu_cap)
    x = torch.randn(2, 256).to(torch.bfloat16)
    assert torch.equal(ops.apply_grouped(x, [2], prepared), ops.apply_linear(x, prepared[0]))
    assert grouped_calls == []


def test_weights_of_two_ops_run_in_one_group_per_op(cpu_cap, grouped_calls):
    """A kernel may choose its op by rows, and a layer's weights may have different kernels: `apply_grouped` groups
    the weights by op (here the AVX2 int4 kernel's, and PyTorch's int4 kernel or our panel), each weight's rows bit
    for bit `apply_linear` on them."""
    n, k = 128, 256
    avx2 = experts("cpu_int4_avx2", "int4g128", 3, n, k, torch.bfloat16, cpu_cap)
    int4pack = experts("cpu_int4pack", "int4g64", 4, n, k, torch.bfloat16, cpu_cap)
    if cpu_grouped.load_extension():
        pytest.skip(f"the grouped op did not build here: {cpu_grouped.load_extension()}")
    prepared = [int4pack[0], avx2[0], int4pack[1], avx2[1], int4pack[2], avx2[2], int4pack[3]]
    counts = [1, 3, 2, 5, 1, 2, 4]
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    out = ops.apply_grouped(x, counts, prepared)
    start = 0
    for count, weight in zip(counts, prepared):
        assert torch.equal(out[start:start + count], ops.apply_linear(x[start:start + count], weight)), count
        start += count
    assert grouped_calls == [size for size in (4, 3) if size >= max(2, torch.get_num_threads())], grouped_calls


def test_grouped_op_refuses_arguments_that_do_not_fit_its_op(cpu_cap):
    prepared = experts("cpu_int4pack", "int4g128", 2, 128, 256, torch.bfloat16, cpu_cap)
    if cpu_grouped.load_extension():
        pytest.skip(f"the grouped op did not build here: {cpu_grouped.load_extension()}")
    x = torch.randn(3, 256).to(torch.bfloat16)
    out = torch.empty(3, 128, dtype=torch.bfloat16)
    row_ops = [ops._row_op(p, x.dtype, 1) for p in prepared]
    op = row_ops[0].op
    tensors = [t for r in row_ops for t in r.tensors]
    with pytest.raises(RuntimeError, match=rf"3 tensors for 2 weights of {re.escape(op)}, expected 4"):
        torch.ops.nano_cpu.grouped_rows_(out, x, None, [0, 1, 1, 3], op, tensors[:3], [128, 128])
    with pytest.raises(RuntimeError, match=r"rows \[1, 4\) of weight 1 are not a non-empty range of the 3 rows"):
        torch.ops.nano_cpu.grouped_rows_(out, x, None, [0, 1, 1, 4], op, tensors, [128, 128])
    with pytest.raises(RuntimeError, match=r"op 'linear' is not 'namespace::name'"):
        torch.ops.nano_cpu.grouped_rows_(out, x, None, [0, 1, 1, 3], "linear", tensors, [128, 128])


@pytest.mark.parametrize("rows, cols, targets", [(1, 64, 1), (64, 1024, 16), (300, 2048, 40)])
@pytest.mark.parametrize("src_dtype, dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                              (torch.float16, torch.float32)])
@pytest.mark.parametrize("weighted", [True, False])
def test_weighted_row_sum_equals_index_add(rows, cols, targets, src_dtype, dtype, weighted):
    """Bit for bit the torch ops it replaces, from one row to a size split over the threads (300 x 2048)."""
    if cpu_grouped.load_extension():
        pytest.skip(f"the grouped op did not build here: {cpu_grouped.load_extension()}")
    generator = torch.Generator().manual_seed(rows)
    src = (torch.randn(rows, cols, generator=generator) * 3).to(src_dtype)
    weights = torch.rand(rows, generator=generator) if weighted else None
    index = torch.randint(0, targets, (rows,), generator=generator)
    summed = (src.float() if weights is None else src.float() * weights[:, None])
    want = torch.zeros(targets, cols).index_add_(0, index, summed).to(dtype)
    got = cpu_grouped.weighted_row_sum(src, weights, index, targets, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_weighted_row_sum_refuses_an_index_outside_the_targets():
    if cpu_grouped.load_extension():
        pytest.skip(f"the grouped op did not build here: {cpu_grouped.load_extension()}")
    with pytest.raises(RuntimeError, match="index 3 of row 1 is outside the 3 targets"):
        cpu_grouped.weighted_row_sum(torch.ones(2, 8), None, torch.tensor([0, 3]), 3, torch.float32)
