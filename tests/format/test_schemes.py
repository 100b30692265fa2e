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
