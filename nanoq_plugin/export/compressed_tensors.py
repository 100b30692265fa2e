"""`nanoq export compressed-tensors DIR OUT`: rewrite a nano checkpoint in the compressed-tensors layout that
vLLM, SGLang and transformers read natively.

| nano scheme     | compressed-tensors format | tensors written per linear `[N, K]`                                |
|-----------------|---------------------------|--------------------------------------------------------------------|
| nvfp4           | `nvfp4-pack-quantized`    | `weight_packed` uint8 `[N, K/2]`, `weight_scale` float8_e4m3fn      |
|                 |                           | `[N, K/16]`, `weight_global_scale` float32 `[1]`                   |
| int4gG (sym)    | `pack-quantized` (W4A16)  | `weight_packed` int32 `[N, K/8]`, `weight_scale` `[N, K/G]` in the |
|                 |                           | model dtype, `weight_shape` int64 `[2]`                            |
| int8 (channel)  | `pack-quantized` (W8A16)  | `weight_packed` int32 `[N, K/4]`, `weight_scale` `[N, 1]`, shape   |
| int8, `--activations int8` | `int-quantized` (W8A8) | `weight` int8 `[N, K]`, `weight_scale` float32 `[N, 1]`; the  |
|                 |                           | activations are quantized per token at run time by the engine      |
| int8-a8         | `int-quantized` (W8A8)    | the same: the scheme that computes W8A8 in nano itself             |

The codes are the same numbers in both formats (nano stores them transposed, `[K, N]`): the export moves
bits, it does not re-quantize. Fused q/k/v and gate/up already share one NVFP4 global scale (the quantizer
makes them). Float linears and the LM head go to `ignore`; a quantized embedding or tied head, which
compressed-tensors has no format for, is written dequantized in the model dtype.
The config is built with the `compressed-tensors` package itself (extra `export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import NanoqError
from ..format.checkpoint import SIDE_FILES, CheckpointWriter
from ..format.fp4 import pack_fp4, unpack_fp4
from ..format.packing import unpack_codes
from ..format.reference import dequantize, symmetric_zero
from ..format.schemes import Scheme, SchemeKind
from ..format.validate import load_nano_checkpoint
from ..quantizers.architectures import architecture_for


def _formats() -> dict:
    try:
        from compressed_tensors.quantization import QuantizationArgs  # noqa: F401
    except ImportError:
        raise NanoqError("nanoq export compressed-tensors needs the compressed-tensors package: "
                         "pip install 'nanoq[export]'") from None
    return {"nvfp4": "nvfp4-pack-quantized", "int4": "pack-quantized", "int8": "pack-quantized",
            "int8-w8a8": "int-quantized"}


ACTIVATIONS = ("none", "int8")


def _check_exportable(scheme: Scheme, module: str, activations: str) -> str:
    if scheme.quantizes_activations:  # int8-a8 is W8A8 whatever --activations says
        return "int8-w8a8"
    if activations == "int8":
        if scheme.kind is SchemeKind.INT8_CHANNEL:
            return "int8-w8a8"
        raise NanoqError(f"{module}: --activations int8 (W8A8) needs int8 per-channel weights (scheme {scheme.name})")
    if scheme.kind is SchemeKind.NVFP4:
        return "nvfp4"
    if scheme.kind is SchemeKind.INT_GROUP and scheme.bits == 4 and scheme.symmetric:
        return "int4"
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return "int8"
    raise NanoqError(f"{module}: scheme {scheme.name} has no compressed-tensors export "
                     "(exportable: nvfp4, int4gG symmetric, int8)")


def _weights_args(scheme: Scheme):
    """compressed-tensors' QuantizationArgs of a nano scheme's weights."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    if scheme.kind is SchemeKind.NVFP4:
        return QuantizationArgs(num_bits=4, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR_GROUP,
                                symmetric=True, dynamic=False, group_size=16, scale_dtype=torch.float8_e4m3fn,
                                zp_dtype=torch.float8_e4m3fn)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.CHANNEL,
                                symmetric=True, dynamic=False)
    return QuantizationArgs(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
                            symmetric=True, dynamic=False, group_size=scheme.group_size)


def _input_args(kind: str):
    """QuantizationArgs of the activations: dynamic symmetric int8 per token for W8A8, else None."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    if kind != "int8-w8a8":
        return None
    return QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.TOKEN,
                            symmetric=True, dynamic=True)


def _nvfp4_tensors(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    codes = unpack_fp4(stored["qweight"], 0)  # [K, N]
    return {"weight_packed": pack_fp4(codes.t().contiguous(), 1), "weight_scale": stored["scales"].t().contiguous(),
            "weight_global_scale": stored["global_scale"].reshape(1).contiguous()}


def _int4_tensors(stored: dict[str, torch.Tensor], scheme: Scheme, out_features: int, in_features: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = unpack_codes(stored["qweight"], scheme.bits).to(torch.int16) - symmetric_zero(scheme.bits)  # [K, N]
    return {"weight_packed": pack_to_int32(values.t().to(torch.int8).contiguous(), scheme.bits),
            "weight_scale": stored["scales"].t().to(dtype).contiguous(),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}


def _int8_tensors(stored: dict[str, torch.Tensor], out_features: int, in_features: int, dtype: torch.dtype,
                  w8a8: bool) -> dict[str, torch.Tensor]:
    """nano int8 `qweight [K, N]`, `scales [N]` -> W8A8 `weight` int8 `[N, K]` + float32 `weight_scale [N, 1]`
    (what vLLM's int8 scaled-mm layers allocate), or W8A16 `weight_packed` int32 `[N, K/4]` + `weight_scale`
    `[N, 1]` in the model dtype."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    weight = stored["qweight"].t().contiguous()
    if w8a8:
        return {"weight": weight, "weight_scale": stored["scales"].to(torch.float32).reshape(-1, 1).contiguous()}
    return {"weight_packed": pack_to_int32(weight, 8),
            "weight_scale": stored["scales"].to(dtype).reshape(-1, 1).contiguous(),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}


def export_compressed_tensors(nano_dir: str | os.PathLike, output_dir: str | os.PathLike,
                              activations: str = "none") -> Path:
    """Write the compressed-tensors checkpoint of the nano checkpoint `nano_dir` to `output_dir` (atomically).

    `activations="int8"` (int8 per-channel checkpoints only) writes W8A8: the engine quantizes each token's
    activations to int8 at run time and runs an int8 GEMM; the default keeps activations in the model dtype.
    """
    if activations not in ACTIVATIONS:
        raise NanoqError(f"unknown activation quantization {activations!r} (one of {', '.join(ACTIVATIONS)})")
    formats = _formats()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    checkpoint = load_nano_checkpoint(nano_dir)
    experts = checkpoint.experts_modules()
    if experts:  # per-expert linears would need compressed-tensors' MoE layout and an engine test: not done yet
        raise NanoqError(f"{checkpoint.directory}: a mixture-of-experts checkpoint ({len(experts)} MoE blocks, e.g. "
                         f"'{experts[0].block}') has no compressed-tensors export yet; serve the nano checkpoint "
                         "itself (--quantization nano)")
    config = json.loads((checkpoint.directory / "config.json").read_text())
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"))
    arch = architecture_for(config, str(checkpoint.directory / "config.json"))
    modules = checkpoint.quant_config.modules
    tables = {m for m in modules if m in (arch.embedding, checkpoint.quant_config.tied_lm_head)}
    linears = {m: s for m, s in modules.items() if m not in tables}
    kinds = {_check_exportable(s, m, activations) for m, s in linears.items()}
    if len(kinds) != 1:
        raise NanoqError(f"{checkpoint.directory}: compressed-tensors export needs quantized linears of one kind "
                         f"(found: {', '.join(sorted(kinds)) or 'none'})")
    kind = kinds.pop()
    by_scheme: dict[Scheme, list[str]] = {}
    for module, scheme in linears.items():
        by_scheme.setdefault(scheme, []).append(module)
    if len(by_scheme) == 1:  # the usual case: every non-ignored Linear
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=_weights_args(next(iter(by_scheme))),
                                                input_activations=_input_args(kind))}
    else:  # e.g. group-size fallbacks: one config group per scheme, targets by module name
        groups = {f"group_{i}": QuantizationScheme(targets=sorted(names), weights=_weights_args(scheme),
                                                   input_activations=_input_args(kind))
                  for i, (scheme, names) in enumerate(sorted(by_scheme.items(), key=lambda item: item[0].name))}

    block_linears = [m for i in range(int(config["num_hidden_layers"])) for m in arch.linears_of_block(i)]
    ignore = [m for m in block_linears if m not in linears] + [arch.lm_head]
    quant_config = QuantizationConfig(config_groups=groups, format=formats[kind], ignore=ignore,
                                      quantization_status=QuantizationStatus.COMPRESSED)

    with CheckpointWriter(output_dir) as writer:
        handled: set[str] = set()
        for module, module_scheme in modules.items():
            shape = checkpoint.module_shape(module)
            stored = checkpoint.module_tensors(module)
            handled.update(f"{module}.{name}" for name in stored)
            if module in tables:
                writer.add(f"{module}.weight", dequantize(stored, module_scheme, *shape, dtype=dtype))
            elif kind == "nvfp4":
                for name, tensor in _nvfp4_tensors(stored).items():
                    writer.add(f"{module}.{name}", tensor)
            elif kind == "int4":
                for name, tensor in _int4_tensors(stored, module_scheme, *shape, dtype).items():
                    writer.add(f"{module}.{name}", tensor)
            else:
                for name, tensor in _int8_tensors(stored, *shape, dtype, kind == "int8-w8a8").items():
                    writer.add(f"{module}.{name}", tensor)
        rest = [n for n in checkpoint.tensors.keys() if n not in handled]
        for name, tensor in checkpoint.tensors.items(rest):
            writer.add(name, tensor)
        config["quantization_config"] = quant_config.to_dict()
        copies = [checkpoint.directory / f for f in SIDE_FILES if (checkpoint.directory / f).is_file()]
        return writer.commit({"config.json": config}, copies)
