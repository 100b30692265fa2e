"""int8 per channel on our CPU kernels. Scheme int8-a8 (per-token int8 activations x per-channel int8 weights):
the spec against integer arithmetic done another way, and both int8-a8 kernels (AVX-512 VNNI, AVX2) against the
spec, bit for bit, each wherever the hardware runs it. Weight-only int8 with bfloat16 activations: the bf16
dot-product kernel against float32 arithmetic."""

import pytest
import torch

from nanoq_plugin.format.activations import int8_dynamic_linear, quantize_per_token
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import INT8_CHANNEL, INT8_DYNAMIC_A8
from nanoq_plugin.kernels import ops
from nanoq_plugin.quantizers.rtn import quantize_rtn

from cpu_expectations import expected_cpu_kernel, prepare_with_kernel, skip_unless_hardware_has
from schemes_under_test import rel_error

DYNAMIC_KERNELS = ["cpu_int8_vnni", "cpu_int8_avx2"]


def stored_int8(n: int, k: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(stored int8 tensors: qweight `[K, N]`, scales `[N]`; the float32 weight they dequantize to `[N, K]`)."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    tensors = quantize_rtn(weight, INT8_CHANNEL)
    return tensors, dequantize(tensors, INT8_CHANNEL, n, k)


def test_per_token_quantization_by_the_definition():
    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 3.0]], dtype=torch.bfloat16)
    x_q, scale = quantize_per_token(x)
    assert x_q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert scale[:, 0].tolist() == pytest.approx([2.0 / 127, 0.0, 3.0 / 127])
    assert x_q.tolist() == [[32, -127, 64, 0], [0, 0, 0, 0], [127, 64, -32, 127]]  # 31.75 -> 32, 63.5 -> 64 (even)


def test_spec_sums_are_exact_integers():
    tensors, _ = stored_int8(48, 1536, 0)
    x = torch.randn(5, 1536, dtype=torch.float32) * 4
    x_q, scale = quantize_per_token(x)
    exact = (x_q.to(torch.int64).unsqueeze(-1) * tensors["qweight"].to(torch.int64)).sum(dim=1)  # [M, N] int64
    want = exact.to(torch.float32) * scale * tensors["scales"].to(torch.float32)
    assert torch.equal(int8_dynamic_linear(x, tensors["qweight"], tensors["scales"]), want)


def test_spec_is_close_to_the_weight_only_product():
    tensors, weight = stored_int8(64, 256, 1)
    x = torch.randn(7, 256)
    assert rel_error(int8_dynamic_linear(x, tensors["qweight"], tensors["scales"]), x @ weight.t()) < 1e-2


@pytest.mark.parametrize("kernel_name", DYNAMIC_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n, k", [(16, 4), (80, 20), (208, 1100), (576, 576)])
def test_int8_a8_kernel_matches_the_spec_bit_for_bit(cpu_cap, kernel_name, dtype, n, k):
    """Every row count a tile holds (1-6) and more (row tiles of 4 and 6, K in chunks of 256 with a remainder, K
    not a multiple of 8), outputs in whole 64-wide blocks and in 16-wide remainders, a row of zeros."""
    tensors, _ = stored_int8(n, k, 2)
    prepared = prepare_with_kernel(kernel_name, tensors, INT8_DYNAMIC_A8, n, k, dtype, cpu_cap)
    generator = torch.Generator().manual_seed(3)
    for rows in (1, 2, 3, 4, 5, 6, 7, 13, 20, 65):
        x = (torch.randn(rows, k, generator=generator) * 3).to(dtype)
        x[rows // 2] = 0
        got = ops.apply_linear(x, prepared)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert torch.equal(got, int8_dynamic_linear(x, tensors["qweight"], tensors["scales"])), rows


def test_int8_a8_with_bias_and_leading_dims_and_the_direct_path():
    tensors, _ = stored_int8(96, 128, 4)
    prepared = ops.prepare_linear(tensors, INT8_DYNAMIC_A8, 96, 128, torch.bfloat16, "cpu")
    assert prepared.kernel == expected_cpu_kernel(INT8_DYNAMIC_A8, torch.bfloat16)
    x, bias = torch.randn(2, 3, 128, dtype=torch.bfloat16), torch.randn(96)
    want = int8_dynamic_linear(x, tensors["qweight"], tensors["scales"]) + bias.to(torch.bfloat16)
    assert torch.equal(ops.apply_linear(x, prepared, bias), want)
    assert torch.equal(ops.quantized_linear(x, tensors, INT8_DYNAMIC_A8, bias), want)  # the reference op


@pytest.mark.parametrize("kernel_name", DYNAMIC_KERNELS)
def test_embedding_rows_come_back_from_the_packed_blocks(cpu_cap, kernel_name):
    tensors, weight = stored_int8(160, 64, 5)
    prepared = prepare_with_kernel(kernel_name, tensors, INT8_DYNAMIC_A8, 160, 64, torch.bfloat16, cpu_cap)
    assert {"packed", "scales"} <= set(prepared.tensors)
    ids = torch.tensor([[3, 159], [0, 17]])
    torch.testing.assert_close(ops.gather_embedding(ids, prepared, torch.float32), weight[ids], rtol=1e-2, atol=1e-3)


def test_outputs_not_a_multiple_of_16_run_the_reference_and_say_why():
    from nanoq_plugin.kernels.base import LinearConfig
    from nanoq_plugin.kernels.cpu_int8_simd import CpuInt8DynamicAvx2Kernel, CpuInt8DynamicKernel

    for kernel in (CpuInt8DynamicKernel(), CpuInt8DynamicAvx2Kernel()):  # the shape is the reason on any CPU
        ok, why = kernel.can_implement(LinearConfig(INT8_DYNAMIC_A8, 200, 64, torch.bfloat16, "cpu"))
        assert not ok and "multiple of 16" in why, why
    tensors, _ = stored_int8(200, 64, 6)
    prepared = ops.prepare_linear(tensors, INT8_DYNAMIC_A8, 200, 64, torch.bfloat16, "cpu")
    assert prepared.kernel == "reference"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(ops.apply_linear(x, prepared), int8_dynamic_linear(x, tensors["qweight"], tensors["scales"]))


def test_weight_only_int8_never_gets_the_int8_activation_kernel():
    tensors, _ = stored_int8(64, 64, 7)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert ops.prepare_linear(tensors, INT8_CHANNEL, 64, 64, dtype, "cpu").kernel not in DYNAMIC_KERNELS


@pytest.mark.parametrize("n, k", [(16, 2), (80, 20), (208, 1100), (576, 576)])
def test_bf16_dot_kernel_is_the_float32_product_rounded_once(uncapped, n, k):
    """Weight-only int8 with bfloat16 activations: every row count a tile holds and more, K in chunks of 128 with
    a remainder, 16-wide output remainders. The kernel sums in float32 in its own order, so it may differ from
    float32 arithmetic by the last bfloat16 place, no more."""
    skip_unless_hardware_has("cpu_int8_bf16dot")
    tensors, _ = stored_int8(n, k, 9)
    prepared = ops.prepare_linear(tensors, INT8_CHANNEL, n, k, torch.bfloat16, "cpu")
    assert prepared.kernel == "cpu_int8_bf16dot" and set(prepared.tensors) == {"packed", "scales"}
    generator = torch.Generator().manual_seed(10)
    q, scales = tensors["qweight"].to(torch.float64), tensors["scales"].to(torch.float64)
    for rows in (1, 2, 5, 6, 7, 13, 65):
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        got = ops.apply_linear(x, prepared)
        exact = (x.to(torch.float64) @ q) * scales  # [M, N]
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # one bfloat16 place
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.to(torch.float64) - exact).abs() <= ulp + 1e-6).all(), rows


def test_bf16_dot_kernel_table_rows_and_fallbacks(uncapped):
    skip_unless_hardware_has("cpu_int8_bf16dot")
    tensors, weight = stored_int8(160, 64, 11)
    prepared = ops.prepare_linear(tensors, INT8_CHANNEL, 160, 64, torch.bfloat16, "cpu", is_embedding=True)
    assert prepared.kernel == "cpu_int8_bf16dot"
    ids = torch.tensor([[3, 159], [0, 17]])
    torch.testing.assert_close(ops.gather_embedding(ids, prepared, torch.float32), weight[ids], rtol=1e-2, atol=1e-3)
    tensors, _ = stored_int8(200, 64, 12)  # N % 16 != 0: PyTorch's int8 kernel
    assert ops.prepare_linear(tensors, INT8_CHANNEL, 200, 64, torch.bfloat16, "cpu").kernel == "cpu_int8pack"


@pytest.mark.parametrize("kernel_name, op, scheme, dtype, names", [
    ("cpu_int8_vnni", "int8_dynamic_linear", INT8_DYNAMIC_A8, torch.float32, ("packed", "weight_sums", "scales")),
    ("cpu_int8_avx2", "int8_dynamic_linear_avx2", INT8_DYNAMIC_A8, torch.float32, ("packed", "scales")),
    ("cpu_int8_bf16dot", "int8_weight_only_linear", INT8_CHANNEL, torch.bfloat16, ("packed", "scales")),
    ("cpu_int8_wo_avx2", "int8_weight_only_linear_avx2", INT8_CHANNEL, torch.bfloat16, ("packed", "scales")),
])
def test_int8_ops_pass_opcheck(cpu_cap, kernel_name, op, scheme, dtype, names):
    tensors, _ = stored_int8(64, 32, 8)
    prepared = prepare_with_kernel(kernel_name, tensors, scheme, 64, 32, dtype, cpu_cap).tensors
    for rows in (1, 9):
        torch.library.opcheck(getattr(torch.ops.nano_cpu, op).default,
                              (torch.randn(rows, 32, dtype=dtype), *(prepared[name] for name in names)),
                              test_utils=("test_schema", "test_faketensor"))


def test_a_w8a8_checkpoint_in_transformers_is_the_reference_model_with_quantized_inputs(tmp_path, make_tiny_model):
    """The whole path: the w8a8 preset with the embedding in int8-a8 and the head tied over it, loaded with
    transformers (NanoLinear / NanoTiedHead on this CPU's kernel), against `dequantized_float_model`, which
    quantizes the same inputs per token in float; without that, the reference would be the weight-only model."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    import nanoq_plugin  # noqa: F401  (registers the "nano" quantization method)
    from nanoq_plugin.eval.reference_model import dequantized_float_model
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    source = make_tiny_model("llama", tmp_path / "src", tie_word_embeddings=True, perturb_norms=False)
    recipe = replace(load_recipe("w8a8"), embeddings=INT8_DYNAMIC_A8)
    quantize_checkpoint(source, tmp_path / "nano", recipe, progress=False)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "nano", dtype=torch.float32).eval()
    reference = dequantized_float_model(source, tmp_path / "nano")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = served(ids).logits, reference(ids).logits
        for module in reference.modules():
            module._forward_pre_hooks.clear()
        weight_only = reference(ids).logits
    gap = (got - want).abs().max().item()
    assert gap < 1e-4 * want.abs().max().item(), gap
    assert (weight_only - want).abs().max().item() > 100 * gap
