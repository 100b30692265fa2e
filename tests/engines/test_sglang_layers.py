"""SGLang's own linear layers with the `nano` method, on the CPU at tensor-parallel size 1 (and the two
ranks of size 2, built one after the other in this process: SGLang shards weights without process groups).

Each layer is built by SGLang (ColumnParallelLinear, RowParallelLinear, QKVParallelLinear,
MergedColumnParallelLinear), gets the checkpoint tensors of `format.reference.compress` through the
weight loaders SGLang's models call (`param.weight_loader(param, tensor[, shard_id])`), and must match
the oracle: `format.reference.dequantize` per checkpoint module, then a float32 matmul.
"""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.linear import (  # noqa: E402
    WEIGHT_LOADER_V2_SUPPORTED,
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod  # noqa: E402

from nanoq_plugin.engines.sglang import NanoSglangConfig, NanoSglangLinearMethod, register  # noqa: E402
from nanoq_plugin.errors import NanoqError  # noqa: E402
from nanoq_plugin.format.quant_config import NanoQuantConfig  # noqa: E402
from nanoq_plugin.format.reference import compress, dequantize  # noqa: E402
from nanoq_plugin.format.schemes import SchemeKind, parse_scheme  # noqa: E402
from nanoq_plugin.kernels.ops import PreparedParts  # noqa: E402
from nanoq_plugin.quantizers.codebook import quantize_codebook  # noqa: E402
from nanoq_plugin.quantizers.rtn import rtn_scales  # noqa: E402

SCHEMES = ("int4g128", "int4g64-asym", "int3g128", "int8", "cb4g64", "cb2g128")
HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTERMEDIATE = 256, 32, 4, 2, 384
ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"


@pytest.fixture(scope="module", autouse=True)
def sglang_tp1(tmp_path_factory):
    """World of one gloo process and SGLang's model-parallel groups (its layers read them even at TP 1).

    SGLang publishes its topology from server arguments, which read the model's config.json: a tiny one.
    """
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs
    from transformers import LlamaConfig

    model_dir = tmp_path_factory.mktemp("sglang-config")
    LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, vocab_size=320,
                architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parallel_state.init_distributed_environment(
        world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
    )
    reset_context()
    publish(ServerArgs(model_path=str(model_dir), device="cpu", tp_size=1), role="test", ranks=SpawnRanks(world_rank=0))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    parallel_state.initialize_model_parallel(backend="gloo")
    register()
    yield model_dir
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()
    reset_context()


def make_config(modules: dict[str, str]) -> NanoSglangConfig:
    schemes = {name: parse_scheme(name) for name in set(modules.values())}
    quant = NanoQuantConfig(modules={module: schemes[name] for module, name in modules.items()})
    return NanoSglangConfig.from_config(quant.to_dict())


def checkpoint_module(out_features: int, in_features: int, scheme_name: str, seed: int):
    """Random weight `[out, in]`, its stored tensors (RTN scales) and the oracle weight (reference dequantize)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    scheme = parse_scheme(scheme_name)
    if scheme.kind is SchemeKind.CODEBOOK:  # one Lloyd-Max table per module: the parts of a fused layer differ
        tensors = quantize_codebook(weight, scheme)
    else:
        tensors = compress(weight, scheme, *rtn_scales(weight, scheme))
    return tensors, dequantize(tensors, scheme, out_features, in_features)


def load(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    """Feed one checkpoint module's tensors through the layer's parameters as SGLang's model loaders do."""
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard_id)


def check_output(layer, oracle_weight: torch.Tensor, in_features: int, bias: torch.Tensor | None = None) -> None:
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(7))
    out, _ = layer(x)
    expected = x @ oracle_weight.t() + (0 if bias is None else bias)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_column_parallel(scheme):
    prefix = f"{MLP}.up_proj"
    layer = ColumnParallelLinear(HIDDEN, 160, bias=True, params_dtype=torch.float32,
                                 quant_config=make_config({prefix: scheme}), prefix=prefix)
    assert isinstance(layer.quant_method, NanoSglangLinearMethod)
    tensors, weight = checkpoint_module(160, HIDDEN, scheme, seed=1)
    load(layer, tensors)
    bias = torch.randn(160)
    layer.bias.weight_loader(layer.bias, bias)
    check_output(layer, weight, HIDDEN, bias)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_parallel(scheme):
    prefix = f"{MLP}.down_proj"
    layer = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False, params_dtype=torch.float32,
                              quant_config=make_config({prefix: scheme}), prefix=prefix)
    tensors, weight = checkpoint_module(HIDDEN, INTERMEDIATE, scheme, seed=2)
    load(layer, tensors)
    check_output(layer, weight, INTERMEDIATE)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qkv_parallel(scheme):
    parts = {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM}
    config = make_config({f"{ATTN}.{shard}_proj": scheme for shard in parts})
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, params_dtype=torch.float32,
                              quant_config=config, prefix=f"{ATTN}.qkv_proj")
    weights = []
    for seed, (shard, out_features) in enumerate(parts.items()):
        tensors, weight = checkpoint_module(out_features, HIDDEN, scheme, seed=10 + seed)
        load(layer, tensors, shard)
        weights.append(weight)
    check_output(layer, torch.cat(weights), HIDDEN)
    assert isinstance(layer.nano_prepared, PreparedParts) == scheme.startswith("cb")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merged_gate_up(scheme):
    config = make_config({f"{MLP}.gate_proj": scheme, f"{MLP}.up_proj": scheme})
    layer = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, params_dtype=torch.float32,
                                       quant_config=config, prefix=f"{MLP}.gate_up_proj")
    weights = []
    for shard in (0, 1):
        tensors, weight = checkpoint_module(INTERMEDIATE, HIDDEN, scheme, seed=20 + shard)
        load(layer, tensors, shard)
        weights.append(weight)
    check_output(layer, torch.cat(weights), HIDDEN)


def test_bfloat16_activations():
    prefix = f"{MLP}.down_proj"
    layer = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False, params_dtype=torch.bfloat16,
                              quant_config=make_config({prefix: "int4g128"}), prefix=prefix)
    tensors, weight = checkpoint_module(HIDDEN, INTERMEDIATE, "int4g128", seed=3)
    load(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(4, INTERMEDIATE).to(torch.bfloat16)
    out, _ = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() @ weight.t()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_float_module_gets_sglang_unquantized_method():
    layer = ColumnParallelLinear(HIDDEN, 64, bias=False, params_dtype=torch.float32,
                                 quant_config=make_config({f"{MLP}.up_proj": "int4g128"}), prefix="lm_head")
    assert type(layer.quant_method) is UnquantizedLinearMethod
    assert hasattr(layer, "weight") and not hasattr(layer, "qweight")


def test_quantized_embedding_is_refused_not_loaded_as_float():
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

    with pytest.raises(NanoqError, match=r"lm_head is quantized, but the SGLang adapter .* not ParallelLMHead"):
        ParallelLMHead(320, HIDDEN, params_dtype=torch.float32, quant_config=make_config({"lm_head": "int8"}),
                       prefix="lm_head")


def test_fused_parts_with_different_schemes_are_refused():
    config = make_config({f"{MLP}.gate_proj": "int4g128", f"{MLP}.up_proj": "int8"})
    with pytest.raises(NanoqError, match=r"gate_up_proj is fused by SGLang .*gate_proj=int4g128, .*up_proj=int8"):
        config.get_quant_method(LinearBase(1, 1), f"{MLP}.gate_up_proj")


def test_tensor_missing_from_checkpoint_is_an_error():
    config = make_config({f"{MLP}.gate_proj": "int4g64-asym", f"{MLP}.up_proj": "int4g64-asym"})
    layer = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, params_dtype=torch.float32,
                                       quant_config=config, prefix=f"{MLP}.gate_up_proj")
    for shard in (0, 1):
        tensors, _ = checkpoint_module(INTERMEDIATE, HIDDEN, "int4g64-asym", seed=shard)
        if shard == 1:
            del tensors["zeros"]
        load(layer, tensors, shard)
    with pytest.raises(NanoqError, match=r"gate_up_proj: tensor 'zeros' \(int4g64-asym\) .*\(loaded 1 of 2 parts\)"):
        layer.quant_method.process_weights_after_loading(layer)


def test_group_size_must_divide_input_dim():
    prefix = f"{MLP}.down_proj"
    with pytest.raises(NanoqError, match=rf"{prefix}: group size 128 does not divide input dim 96"):
        RowParallelLinear(96, HIDDEN, bias=False, params_dtype=torch.float32,
                          quant_config=make_config({prefix: "int4g128"}), prefix=prefix)


def test_registration_is_idempotent_and_reaches_sglang_registries(sglang_tp1):
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.server_args import QUANTIZATION_CHOICES, prepare_server_args

    register()
    register()
    assert QUANTIZATION_METHODS["nano"] is NanoSglangConfig
    assert get_quantization_config("nano") is NanoSglangConfig
    assert QUANTIZATION_CHOICES.count("nano") == 1
    assert WEIGHT_LOADER_V2_SUPPORTED.count("NanoSglangLinearMethod") == 1
    args = prepare_server_args(["--model-path", str(sglang_tp1), "--quantization", "nano", "--device", "cpu"])
    assert args.quantization == "nano"


def test_from_config_accepts_sglang_extra_keys():
    quant = NanoQuantConfig(modules={f"{ATTN}.q_proj": parse_scheme("int8")}).to_dict()
    config = NanoSglangConfig.from_config({**quant, "packed_modules_mapping": {"qkv_proj": ["q_proj"]},
                                           "hf_config": None})
    assert config.scheme_of(f"{ATTN}.qkv_proj") == parse_scheme("int8")
    with pytest.raises(NanoqError, match="not a nano checkpoint"):
        NanoSglangConfig.from_config({"quant_method": "gptq"})


def test_quantized_experts_are_refused_until_sglang_has_a_nano_moe_method():
    """Quantized experts would otherwise reach SGLang's FusedMoE with no nano method and load nothing; float experts
    and the dense linears of the same model still configure."""
    experts = "model.layers.1.mlp.experts"
    quant = NanoQuantConfig(modules={f"{ATTN}.q_proj": parse_scheme("int8"),
                                     **{f"{experts}.{e}.{proj}": parse_scheme("int4g128")
                                        for e in range(4) for proj in ("gate_proj", "up_proj", "down_proj")}})
    with pytest.raises(NanoqError, match=rf"the experts of {experts} are quantized, and the SGLang adapter has no "
                                         "mixture-of-experts method"):
        NanoSglangConfig.from_config({**quant.to_dict(), "hf_config": None})
    dense_only = NanoQuantConfig(modules={f"{ATTN}.q_proj": parse_scheme("int8")})
    assert NanoSglangConfig.from_config({**dense_only.to_dict(), "hf_config": None}).scheme_of(f"{ATTN}.q_proj")


def test_from_config_validates_a_local_checkpoint(tmp_path):
    quant = NanoQuantConfig(modules={f"{ATTN}.q_proj": parse_scheme("int8")}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    with pytest.raises(NanoqError, match="nano_manifest.json"):
        NanoSglangConfig.from_config({**quant, "hf_config": SimpleNamespace(name_or_path=str(tmp_path))})


def tp2_rank(rank: int):
    """SGLang's layers at tensor-parallel rank `rank` of 2, without process groups (each rank in turn here)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().override(tp_size=2, tp_rank=rank, attn_tp_size=2, attn_tp_rank=rank, moe_tp_size=2,
                                   moe_tp_rank=rank, tp_group=None, attn_tp_group=None)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tp2_shards_match_the_oracle(scheme):
    """Each rank's qkv output is its slice of the oracle's; the ranks' row-parallel partial sums add up to it."""
    parts = {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM}
    qkv = {shard: checkpoint_module(n, HIDDEN, scheme, seed=30 + i) for i, (shard, n) in enumerate(parts.items())}
    down_tensors, down_weight = checkpoint_module(HIDDEN, INTERMEDIATE * 2, scheme, seed=40)
    generator = torch.Generator().manual_seed(8)
    x, h = torch.randn(3, HIDDEN, generator=generator), torch.randn(3, INTERMEDIATE * 2, generator=generator)
    down_sum = torch.zeros(3, HIDDEN)
    for rank in (0, 1):
        with tp2_rank(rank):
            config = make_config({f"{ATTN}.{s}_proj": scheme for s in parts} | {f"{MLP}.down_proj": scheme})
            layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, params_dtype=torch.float32,
                                      quant_config=config, prefix=f"{ATTN}.qkv_proj")
            for shard, (tensors, _) in qkv.items():
                load(layer, tensors, shard)
            layer.quant_method.process_weights_after_loading(layer)
            expected = torch.cat([w.chunk(2)[rank] for _, w in qkv.values()])
            torch.testing.assert_close(layer.quant_method.apply(layer, x), x @ expected.t(), rtol=1e-4, atol=1e-4)

            down = RowParallelLinear(INTERMEDIATE * 2, HIDDEN, bias=False, params_dtype=torch.float32,
                                     quant_config=config, prefix=f"{MLP}.down_proj")
            load(down, down_tensors)
            down.quant_method.process_weights_after_loading(down)
            down_sum += down.quant_method.apply(down, h.chunk(2, dim=1)[rank])
    torch.testing.assert_close(down_sum, h @ down_weight.t(), rtol=1e-4, atol=1e-4)


def test_tp2_split_that_cuts_a_group_is_refused():
    prefix = f"{MLP}.down_proj"
    with tp2_rank(0), pytest.raises(NanoqError, match=rf"{prefix}: input features per tensor-parallel rank "
                                                       r"\(192 of 384\) must be a multiple of the group size 128"):
        RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False, params_dtype=torch.float32,
                          quant_config=make_config({prefix: "int4g128"}), prefix=prefix)


def test_fused_codebook_parts_with_different_rotations_are_refused():
    config = make_config({f"{MLP}.gate_proj": "cb3g64", f"{MLP}.up_proj": "cb3g64"})
    layer = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, params_dtype=torch.float32,
                                       quant_config=config, prefix=f"{MLP}.gate_up_proj")
    gate, _ = checkpoint_module(INTERMEDIATE, HIDDEN, "cb3g64", seed=0)
    load(layer, gate, 0)
    up, _ = checkpoint_module(INTERMEDIATE, HIDDEN, "cb3g64", seed=1)
    up["signs"] = -up["signs"]
    with pytest.raises(NanoqError, match=r"gate_up_proj: tensor 'signs' differs between the parts"):
        load(layer, up, 1)
