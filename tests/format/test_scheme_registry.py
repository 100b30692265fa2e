"""A scheme kind is one registered object: a kind defined in a module of its own (written here to a temporary
file, as a user's plugin would be) is parsed, quantized by the pipeline, dequantized by the reference and
loaded by transformers with no other code knowing it."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import nanoq_plugin  # noqa: F401  (registers the transformers quantizer)
from nanoq_plugin.engines.transformers import NanoLinear
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.format import schemes
from nanoq_plugin.format.kinds import base
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

INT5_KIND_MODULE = '''
"""5-bit symmetric codes, one scale per output channel, stored one code per int8 (a test's scheme kind)."""
import torch

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.kinds import Scheme, SchemeKind, register_kind
from nanoq_plugin.format.tensor_spec import Sharding, TensorSpec

LEVELS = 15


class Int5ChannelKind(SchemeKind):
    value = "test_int5_channel"
    grammar = "int5c"

    def parse(self, name):
        return Scheme(self, bits=5) if name == "int5c" else None

    def validate(self, scheme):
        if scheme.bits != 5 or scheme.group_size is not None:
            raise NanoqError("int5c is 5 bits per output channel")

    def scheme_name(self, scheme):
        return "int5c"

    def fields_to_dict(self, scheme):
        return {"bits": scheme.bits}

    def from_dict(self, data, activation_bits):
        return Scheme(self, bits=int(data["bits"]), activation_bits=activation_bits)

    def param_specs(self, scheme, out_features, in_features):
        return {"qweight": TensorSpec((in_features, out_features), torch.int8),
                "scales": TensorSpec((out_features,), torch.float16, Sharding.OUTPUT)}

    def quantize(self, weight, scheme):
        scales = (weight.abs().amax(dim=1) / LEVELS).clamp_min(2.0**-24).to(torch.float16)
        codes = torch.clamp(torch.round(weight / scales.float()[:, None]), -LEVELS, LEVELS).to(torch.int8)
        return {"qweight": codes.t().contiguous(), "scales": scales}

    def dequantize(self, tensors, scheme, out_features, in_features):
        return (tensors["qweight"].float() * tensors["scales"].float()[None, :]).t()


INT5_CHANNEL = register_kind(Int5ChannelKind())
'''


@pytest.fixture
def int5_kind(tmp_path, monkeypatch):
    """The kind above, imported from a file (registered for this test only)."""
    monkeypatch.setattr(base, "_KINDS", dict(base._KINDS))
    path = tmp_path / "nanoq_test_int5_kind.py"
    path.write_text(INT5_KIND_MODULE)
    spec = importlib.util.spec_from_file_location("nanoq_test_int5_kind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INT5_CHANNEL


def test_a_kind_survives_pickling_and_copying_as_the_registered_object():
    """Engines pickle configs into worker processes; kernels compare kinds by identity."""
    import copy
    import pickle

    for name in ("int8", "int4g128", "cb3g128", "nvfp4", "float"):
        scheme = schemes.parse_scheme(name)
        for twin in (pickle.loads(pickle.dumps(scheme)), copy.deepcopy(scheme), copy.copy(scheme)):
            assert twin == scheme and twin.kind is scheme.kind


def test_an_unregistered_kind_is_refused_by_name(tmp_path):
    with pytest.raises(NanoqError, match=r"unknown scheme 'int5c' \(valid: float, .* or cb"):
        schemes.parse_scheme("int5c")
    with pytest.raises(NanoqError, match=r"config.json: unknown scheme kind 'test_int5_channel'"):
        schemes.Scheme.from_dict({"kind": "test_int5_channel", "bits": 5}, "config.json")


def test_a_kind_from_its_own_module_round_trips_quantize_reference_and_transformers(int5_kind, tiny_model,
                                                                                    tmp_path):
    scheme = schemes.parse_scheme("int5c")
    assert scheme.kind is int5_kind and schemes.Scheme.from_dict(scheme.to_dict()) == scheme
    assert "int5c" in schemes.scheme_grammar()

    recipe = tmp_path / "int5.yaml"
    recipe.write_text("name: int5\nmethod: rtn\ndefault: int5c\n")
    out = tmp_path / "nano-int5"
    result = quantize_checkpoint(tiny_model, out, load_recipe(str(recipe)), progress=False)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {entry["kind"] for entry in config["schemes"].values()} == {"test_int5_channel"}
    module = "model.layers.0.mlp.down_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as stored, \
            safe_open(str(tiny_model / "model.safetensors"), "pt") as source:
        tensors = {name: stored.get_tensor(f"{module}.{name}") for name in ("qweight", "scales")}
        weight = source.get_tensor(f"{module}.weight").float()
        file_bytes = sum(stored.get_tensor(k).numel() * stored.get_tensor(k).element_size() for k in stored.keys())
    assert result.manifest["totals"]["stored_bytes"] == file_bytes  # accounting from the kind's param_specs

    # the reference is the kind's: codes on a 31-level grid per channel, within half a step of the weight
    restored = dequantize(tensors, scheme, *weight.shape)
    step = tensors["scales"].float()[:, None]
    assert (restored / step - torch.round(restored / step)).abs().max() < 1e-3
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()

    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    linears = [m for m in quantized.modules() if isinstance(m, NanoLinear)]
    assert linears and all(m.prepared.kernel == "reference" for m in linears)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = quantized(ids).logits, dequantized_float_model(tiny_model, out)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
