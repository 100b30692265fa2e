"""Nano MoE checkpoints in transformers: every expert projection stored per expert (quantized) loads into a
`NanoExperts` in place of transformers' fused experts module, and computes what the float model carrying the
reference dequantization computes; a missing expert tensor and an expert role in two schemes are refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers  # noqa: F401  (imported first: nanoq registers `nano` with it on import)
from safetensors.torch import load_file, save_file

from nanoq_plugin.engines.transformers import NanoExperts, NanoLinear
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.eval.quantized_model import load_quantized_model
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.format.checkpoint import SourceCheckpoint
from nanoq_plugin.format.layout import param_specs
from nanoq_plugin.format.manifest import MANIFEST_NAME
from nanoq_plugin.format.quant_config import NanoQuantConfig
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import Recipe, Rule
from nanoq_plugin.quantizers.rtn import quantize_rtn
from tiny_models import build_tiny_model

MOE_FAMILIES = ("qwen3_moe", "mixtral")


# gate/up and down of every expert, as the saved names end (Qwen-MoE style and Mixtral's w1/w3/w2)
GATE_UP, DOWN = r"experts\.\d+\.(gate_proj|up_proj|w1|w3)$", r"experts\.\d+\.(down_proj|w2)$"


def quantize(source, out, gate_up: str, down: str, default: str = "int8"):
    """`nanoq quantize` (RTN) of `source` with the experts' gate/up and down projections in the given schemes
    (`float` keeps a role float) and every other linear in `default`."""
    recipe = Recipe("moe-test", parse_scheme(default),
                    rules=(Rule(GATE_UP, parse_scheme(gate_up)), Rule(DOWN, parse_scheme(down))))
    quantize_checkpoint(source, out, recipe, progress=False)
    return out


def load(directory, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def dequantized_reference(source, nano_dir, dtype=torch.float32):
    """The float model of `source` with every quantized expert weight replaced by its reference dequantization,
    written into transformers' fused parameters through transformers' own loader (a per-expert state dict)."""
    from transformers import AutoModelForCausalLM

    checkpoint = SourceCheckpoint(nano_dir)
    quant = NanoQuantConfig.from_dict(checkpoint.config["quantization_config"])
    state = {name: tensor for name, tensor in load_file(str(source / "model.safetensors")).items()}
    for module, scheme in quant.modules.items():
        weight = state[f"{module}.weight"]
        stored = {name: checkpoint.get(f"{module}.{name}") for name in param_specs(scheme, *weight.shape)}
        state[f"{module}.weight"] = dequantize(stored, scheme, *weight.shape).contiguous()  # float32
    for name in checkpoint.keys():  # float tensors a quantizer may have changed
        if name in state and checkpoint.dtype(name).is_floating_point:
            state[name] = checkpoint.get(name)
    tmp = nano_dir.parent / (nano_dir.name + "_reference")
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()


TOKENS = torch.tensor([[1, 17, 33, 250, 9, 88, 121, 7, 64, 300, 45, 2]])


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_experts_load_and_match_the_reference(family, layout, tmp_path):
    """From either source layout (per-expert tensors as `save_pretrained` writes them, or fused 3-D as in memory;
    the same weights), the checkpoint loads and computes the float model of its reference dequantization."""
    source = build_tiny_model(family, tmp_path / "src", num_layers=2)
    quantized_from = build_tiny_model(family, tmp_path / "fused", num_layers=2, fused_experts=True) \
        if layout == "fused" else source
    out = quantize(quantized_from, tmp_path / "nano", "int4g32", "int8")
    model = load(out)
    experts = [m for m in model.modules() if isinstance(m, NanoExperts)]
    assert len(experts) == 2 and all(m.num_experts == 8 for m in experts)
    assert sum(isinstance(m, NanoLinear) for e in experts for m in e.modules()) == 2 * 8 * 3
    assert not any(p.dim() == 3 for p in model.parameters())  # no fused float expert weight is left
    reference = dequantized_reference(source, out)
    float_model = load(source)
    with torch.no_grad():
        got, want, base = model(TOKENS).logits, reference(TOKENS).logits, float_model(TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the experts really are the quantized ones
    # the eval's models of the checkpoint: nanoq's float reference, and eval's two scorings
    checkpoint = load_nano_checkpoint(out)
    evaluated = [dequantized_float_model(source, out)] + [load_quantized_model(checkpoint, torch.float32, scoring)[0]
                                                          for scoring in ("dequantized", "kernels")]
    with torch.no_grad():
        for other in evaluated:
            torch.testing.assert_close(other(TOKENS).logits, want, rtol=1e-4, atol=1e-4)
    # in bfloat16 every expert runs a prepared kernel (not the reference), close to the float32 reference
    fast = load(out, torch.bfloat16)
    kernels = {m.prepared.kernel for e in fast.modules() if isinstance(e, NanoExperts) for m in e.modules()
               if isinstance(m, NanoLinear)}
    assert "reference" not in kernels, kernels
    with torch.no_grad():
        fast_logits = fast(TOKENS).logits.float()
    assert (fast_logits - want).abs().max() <= 0.05 * want.abs().max()


def test_a_float_role_loads_through_transformers_conversion(tmp_path):
    """gate/up quantized, down left float: the float role is merged into the fused parameter as usual."""
    source = build_tiny_model("qwen3_moe", tmp_path / "src", num_layers=1)
    out = quantize(source, tmp_path / "nano", "int8", "float")
    model = load(out)
    reference = dequantized_reference(source, out)
    down = model.model.layers[0].mlp.experts.down_proj
    assert down.dim() == 3 and torch.equal(down, reference.model.layers[0].mlp.experts.down_proj)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, reference(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_a_missing_expert_tensor_is_refused(tmp_path):
    source = build_tiny_model("mixtral", tmp_path / "src", num_layers=1)
    out = quantize(source, tmp_path / "nano", "int8", "int8")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.block_sparse_moe.experts.5.w3.qweight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NanoqError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\.experts\.5\.w3\.qweight' is "
                                         r"missing"):
        load(out)


def test_an_expert_role_in_two_schemes_is_refused(tmp_path):
    source = build_tiny_model("qwen3_moe", tmp_path / "src", num_layers=1)
    out = quantize(source, tmp_path / "nano", "int8", "int8")
    # expert 3's up projection alone in int4g32: its tensors, manifest record and config entry all agree
    module = "model.layers.0.mlp.experts.3.up_proj"
    scheme = parse_scheme("int4g32")
    tensors = load_file(str(out / "model.safetensors"))
    for name in ("qweight", "scales"):
        del tensors[f"{module}.{name}"]
    weight = SourceCheckpoint(source).get(f"{module}.weight").float()
    tensors.update({f"{module}.{n}": t for n, t in quantize_rtn(weight, scheme).items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["schemes"]["int4g32"] = scheme.to_dict()
    config["quantization_config"]["modules"][module] = "int4g32"
    (out / "config.json").write_text(json.dumps(config))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    specs = param_specs(scheme, *weight.shape)
    manifest["modules"][module].update(scheme="int4g32", requested_scheme="int4g32", tensors={
        n: {"dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)} for n, s in specs.items()})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(NanoqError, match=r"MoE block 'model\.layers\.0\.mlp' stores its experts' gate_up_proj in 2 "
                                         r"schemes: int4g32 \(e\.g\. '" + module.replace(".", r"\.") + r"'\), int8"):
        load(out)


def test_exports_refuse_an_moe_checkpoint_with_one_line(tmp_path, capsys):
    """compressed-tensors: not exported yet (refused by name); GGUF exports only float Llama/Qwen2/Qwen3 sources."""
    from nanoq_plugin.cli import main

    source = build_tiny_model("qwen3_moe", tmp_path / "src", num_layers=1)
    out = quantize(source, tmp_path / "nano", "int8", "int8")
    capsys.readouterr()
    assert main(["export", "compressed-tensors", str(out), str(tmp_path / "ct")]) == 2
    assert main(["export", "gguf", str(source), str(tmp_path / "model.gguf")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0] == (f"nanoq: error: {out}: a mixture-of-experts checkpoint (1 MoE blocks, e.g. "
                         "'model.layers.0.mlp') has no compressed-tensors export yet; serve the nano checkpoint "
                         "itself (--quantization nano)")
    assert errors[1].startswith("nanoq: error: ") and "'qwen3_moe' has no GGUF export" in errors[1]
    assert len(errors) == 2 and not (tmp_path / "ct").exists() and not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("stored, message", [
    ("extra", r"tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj' is not part of the Qwen3MoeForCausalLM"),
    ("float twin", r"'model\.layers\.0\.mlp\.experts\.2\.down_proj\.weight' is stored beside the quantized tensors"),
    ("shape", r"tensor 'model\.layers\.0\.mlp\.experts\.6\.gate_proj\.scales' is float16 \[3, 32\], the manifest and "
              r"scheme int4g32 need float16 \[3, 64\]"),
], ids=["extra", "float-twin", "shape"])
def test_stray_or_misshapen_expert_tensors_are_refused(tmp_path, stored, message):
    """A fused 3-D tensor beside the per-expert ones (transformers would load it over them), a float weight
    beside an expert's quantized tensors, or an expert tensor of another shape: refused before loading."""
    source = build_tiny_model("qwen3_moe", tmp_path / "src", num_layers=1)
    out = quantize(source, tmp_path / "nano", "int4g32", "int8")
    tensors = load_file(str(out / "model.safetensors"))
    if stored == "extra":
        tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(8, 128, 96, dtype=torch.bfloat16)
    elif stored == "float twin":
        tensors["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(96, 64, dtype=torch.bfloat16)
    else:
        name = "model.layers.0.mlp.experts.6.gate_proj.scales"
        tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NanoqError, match=message):
        load(out)


def test_inspect_shows_experts_per_block(tmp_path, capsys):
    from nanoq_plugin.cli import main

    source = build_tiny_model("mixtral", tmp_path / "src", num_layers=2)
    out = quantize(source, tmp_path / "nano", "int4g32", "int8")
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "experts.0.w1" not in printed  # expert projections are not listed one by one
    for block in (0, 1):
        assert re.search(rf"model\.layers\.{block}\.block_sparse_moe +8 +2  gate_up_proj int4g32, down_proj int8 +"
                         r"not recorded", printed), printed
    # a calibrated method's routed-token counts and floor, as the quantizer records them in the manifest
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["moe"]["1"].update(routed_tokens=[40, 3, 0, 17, 90, 60, 2, 44], floor=[1, 2, 6], floor_tokens=16)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"model\.layers\.1\.block_sparse_moe .* min 0, median 40, max 90; floor \(< 16 tokens, "
                     r"calibrated on all\): experts 1, 2, 6\n +per expert: 40 3 0 17 90 60 2 44\n", printed), printed


def test_a_float_source_stores_one_expert_layout(tmp_path):
    """Per-expert (save_pretrained) and fused 3-D (in-memory) sources are both accepted; one that mixes them
    (fused gate/up beside per-expert down projections) is refused with one line."""
    from nanoq_plugin.format.expected_tensors import check_float_tensors

    per_expert = build_tiny_model("qwen3_moe", tmp_path / "per_expert", num_layers=1)
    fused = build_tiny_model("qwen3_moe", tmp_path / "fused", num_layers=1, fused_experts=True)
    for source in (per_expert, fused):
        assert [e.block for e in check_float_tensors(SourceCheckpoint(source)).experts] == ["model.layers.0.mlp"]
    tensors = load_file(str(fused / "model.safetensors"))
    down = tensors.pop("model.layers.0.mlp.experts.down_proj")
    tensors.update({f"model.layers.0.mlp.experts.{e}.down_proj.weight": down[e].contiguous() for e in range(8)})
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NanoqError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.down_proj' is missing"):
        check_float_tensors(SourceCheckpoint(fused))
