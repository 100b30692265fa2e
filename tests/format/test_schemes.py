import pytest

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.schemes import FLOAT, INT8_CHANNEL, Scheme, SchemeKind, parse_scheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("suffix", ["", "-asym"])
def test_parse_group_schemes_round_trip(bits, group, suffix):
    scheme = parse_scheme(f"INT{bits}G{group}{suffix} ")
    assert (scheme.kind, scheme.bits, scheme.group_size, scheme.symmetric) == (
        SchemeKind.INT_GROUP, bits, group, suffix == "")
    assert scheme.name == f"int{bits}g{group}{suffix}"
    assert Scheme.from_dict(scheme.to_dict()) == scheme


def test_float_and_int8():
    assert parse_scheme("float") is FLOAT and parse_scheme("int8") is INT8_CHANNEL
    assert FLOAT.to_dict() == {"kind": "float"}
    assert INT8_CHANNEL.to_dict() == {"kind": "int8_channel", "bits": 8}
    assert not FLOAT.is_quantized and INT8_CHANNEL.is_quantized


@pytest.mark.parametrize("text", ["int5g128", "int4g96", "int4", "fp4", "int4g128-sym-asym", ""])
def test_unknown_scheme_lists_valid_forms(text):
    with pytest.raises(NanoqError, match=r"unknown scheme .*valid: float, int8"):
        parse_scheme(text)


def test_from_dict_errors_name_the_place():
    with pytest.raises(NanoqError, match=r"config.json: scheme 'x': unknown scheme kind 'int7'"):
        Scheme.from_dict({"kind": "int7"}, "config.json: scheme 'x'")
    with pytest.raises(NanoqError, match=r"group size 48 is not supported"):
        Scheme.from_dict({"kind": "int_group", "bits": 4, "group_size": 48}, "here")


def test_int8_with_int8_activations():
    from nanoq_plugin.format.schemes import INT8_DYNAMIC_A8

    assert parse_scheme("w8a8") is INT8_DYNAMIC_A8 and parse_scheme(" INT8-A8") is INT8_DYNAMIC_A8
    assert INT8_DYNAMIC_A8.name == "int8-a8" and INT8_DYNAMIC_A8.quantizes_activations
    assert not INT8_CHANNEL.quantizes_activations and INT8_DYNAMIC_A8 != INT8_CHANNEL
    stored = INT8_DYNAMIC_A8.to_dict()
    assert stored == {"kind": "int8_channel", "bits": 8, "activation_bits": 8, "activation_scales": "dynamic_per_token"}
    assert Scheme.from_dict(stored) == INT8_DYNAMIC_A8
    assert Scheme.from_dict({"kind": "int8_channel", "bits": 8}) == INT8_CHANNEL  # checkpoints before int8-a8
    with pytest.raises(NanoqError, match=r"here: int8 activations \(a8\) need int8 per-channel weights"):
        Scheme.from_dict({"kind": "int_group", "bits": 4, "group_size": 128, "activation_bits": 8}, "here")
    with pytest.raises(NanoqError, match=r"activation bits 4 is not supported"):
        Scheme(SchemeKind.INT8_CHANNEL, 8, activation_bits=4)
