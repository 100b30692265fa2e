"""The CPU branch of engines/vllm_moe.NanoFusedMoEMethod.run_experts (rows sorted by expert, each projection's
experts grouped, one activation and one `index_add_`) against the loop it replaced — one expert at a time through
`apply_linear`, vLLM-CPU's activation, the routing weight and `index_add_` — bit for bit. A separate process
(test_vllm_moe runs it, with and without NANOQ_CPU_ISA=avx2), because importing vLLM changes the test process's
torch settings.

A stand-in layer carries only what the branch reads. Expert parallelism: this rank holds global experts 1..8 of
9, so global expert 0's rows must add nothing. Cases: int4 gate/up with int4 or int8 down, a float down role,
routing weights applied to the inputs, tokens whose experts are all another rank's, and 1 to 24 tokens (1 to
~5 rows per expert: the grouped op runs for 2 or more active experts). Prints "ok" when every check passes.

    python tests/engines/vllm_moe_cpu_branch.py
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch


def per_expert(layer, method, x, topk_weights, topk_ids):
    """The reference: one expert at a time, as run_experts computed before it grouped the experts."""
    from vllm.model_executor.layers.fused_moe.activation import ApplyMoEActivationConfig, apply_moe_activation

    from nanoq_plugin.kernels.ops import apply_linear

    tokens, top_k = topk_ids.shape
    ids = layer.expert_map[topk_ids.reshape(-1).long()].long()
    weights = topk_weights.reshape(-1).float()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=layer.local_num_experts + 1).tolist()
    config = ApplyMoEActivationConfig.from_configs(method.moe, method.get_fused_moe_quant_config(layer))
    out = torch.zeros(tokens, x.shape[-1], dtype=torch.float32)
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if not count:
            continue
        rows = order[start:start + count]
        start += count
        token_rows = rows // top_k
        hidden = x[token_rows]
        if layer.apply_router_weight_on_input:
            hidden = hidden * weights[rows, None].to(hidden.dtype)
        linear = {role: (lambda h, role=role: apply_linear(h, layer.nano_experts[role][expert])
                         if role in layer.nano_experts else torch.nn.functional.linear(h, layer.w2_weight[expert]))
                  for role in ("w13", "w2")}
        gate_up = linear["w13"](hidden)
        activated = torch.empty(count, gate_up.shape[-1] // 2, dtype=gate_up.dtype)
        apply_moe_activation(layer.activation, activated, gate_up, activation_config=config)
        down = linear["w2"](activated).float()
        if not layer.apply_router_weight_on_input:
            down = down * weights[rows, None]
        out.index_add_(0, token_rows, down)
    return out.to(x.dtype)


def build(schemes: dict, hidden: int, inter: int, experts: int, generator: torch.Generator):
    """(method, stand-in layer) with random experts prepared as process_weights_after_loading prepares them."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from nanoq_plugin.engines.vllm_moe import NanoFusedMoEMethod
    from nanoq_plugin.kernels.ops import prepare_linear
    from nanoq_plugin.quantizers.rtn import quantize_rtn

    layer = SimpleNamespace(nano_experts={}, activation=MoEActivation.SILU, apply_router_weight_on_input=False,
                            expert_map=torch.arange(-1, experts, dtype=torch.int32), local_num_experts=experts)
    for role, (n, k, parts) in {"w13": (2 * inter, hidden, [inter, inter]), "w2": (hidden, inter, [hidden])}.items():
        weights = [torch.randn(n, k, generator=generator) / k ** 0.5 for _ in range(experts)]
        if schemes[role] is None:
            setattr(layer, f"{role}_weight", torch.stack(weights).to(torch.bfloat16))
            continue
        layer.nano_experts[role] = [prepare_linear(quantize_rtn(w, schemes[role]), schemes[role], n, k,
                                                   torch.bfloat16, "cpu", part_sizes=parts) for w in weights]
    method = NanoFusedMoEMethod.__new__(NanoFusedMoEMethod)  # no vLLM layer config: only what the branch reads
    method.prefix, method.schemes, method.moe_quant_config = "model.layers.0.mlp.experts", schemes, None
    method.moe = SimpleNamespace(is_act_and_mul=True, swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None,
                                 activation_situ_beta=None, activation_situ_linear_beta=None)
    return method, layer


def main() -> int:
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.kernels import cpu_grouped

    assert cpu_grouped.load_extension() == "", cpu_grouped.load_extension()
    calls = []
    real = cpu_grouped.grouped_rows
    cpu_grouped.grouped_rows = lambda out, x, ranges, *rest: (calls.append(len(ranges)), real(out, x, ranges, *rest))[1]
    hidden, inter, experts, top_k = 256, 128, 8, 2
    generator = torch.Generator().manual_seed(11)
    int4, int8 = parse_scheme("int4g128"), parse_scheme("int8")
    for schemes in ({"w13": int4, "w2": int4}, {"w13": int4, "w2": int8}, {"w13": int4, "w2": None}):
        method, layer = build(schemes, hidden, inter, experts, generator)
        for on_input in (False, True):
            layer.apply_router_weight_on_input = on_input
            for tokens in (1, 5, 24):
                x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
                topk_ids = torch.stack([torch.randperm(experts + 1, generator=generator)[:top_k]
                                        for _ in range(tokens)]).to(torch.int32)
                topk_ids[0] = torch.tensor([0, 3])  # one row on another rank's expert
                topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
                out = method.run_experts(layer, x, topk_weights, topk_ids)
                want = per_expert(layer, method, x, topk_weights, topk_ids)
                where = f"{ {r: s and s.name for r, s in schemes.items()} } on_input={on_input} T={tokens}"
                assert out.dtype == torch.bfloat16 and out.shape == (tokens, hidden), where
                assert torch.equal(out, want), f"{where}: max diff {(out.float() - want.float()).abs().max()}"
        elsewhere = torch.zeros(3, top_k, dtype=torch.int32)  # every row on global expert 0, another rank's
        out = method.run_experts(layer, torch.randn(3, hidden).to(torch.bfloat16), torch.ones(3, top_k), elsewhere)
        assert torch.equal(out, torch.zeros(3, hidden, dtype=torch.bfloat16)), "another rank's experts added rows"
    assert calls, "the grouped op never ran"
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
