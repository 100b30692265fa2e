"""--drop / --swap / --duplicate parsing and layer maps (the surgered config: test_surgery_config.py)."""

import pytest

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.surgery.plan import build_layer_map, parse_indices, parse_swaps


def test_issue_example_on_30_blocks():
    layer_map = build_layer_map(30, drop=[10], swap=[(11, 12)], duplicate=[5])
    expected = [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 12, 11, *range(13, 30)]
    assert list(layer_map.sources) == expected
    assert layer_map.num_layers == 30 and layer_map.label() == "drop10+swap11:12+dup5"


def test_operations_commute_and_label_is_canonical():
    a = build_layer_map(8, drop=[6, 1], swap=[(4, 2)], duplicate=[7])
    b = build_layer_map(8, drop=[1, 6], swap=[(2, 4)], duplicate=[7])
    assert a == b and a.sources == (0, 4, 3, 2, 5, 7, 7)
    assert a.label() == "drop1+drop6+swap2:4+dup7"
    assert build_layer_map(8).label() == "baseline" and build_layer_map(8).sources == tuple(range(8))


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": [30]}, r"--drop 30: block 30 is out of range \(the model has 30 blocks, 0..29\)"),
    ({"swap": [(29, 30)]}, r"--swap 29:30: block 30 is out of range"),
    ({"duplicate": [-1]}, r"--duplicate -1: block -1 is out of range"),
    ({"drop": [3], "swap": [(3, 4)]}, r"--swap 3:4: block 3 is already named by --drop 3"),
    ({"swap": [(1, 2), (2, 3)]}, r"--swap 2:3: block 2 is already named by --swap 1:2"),
    ({"drop": [4, 4]}, r"--drop 4: block 4 is already named by --drop 4"),
    ({"drop": [7], "duplicate": [7]}, r"--duplicate 7: block 7 is already named by --drop 7"),
    ({"drop": list(range(30))}, r"--drop removes all 30 blocks"),
])
def test_invalid_operations(kwargs, message):
    with pytest.raises(NanoqError, match=message):
        build_layer_map(30, **kwargs)


def test_parse_flags():
    assert parse_indices(["10", "3, 4"], "--drop") == [10, 3, 4]
    assert parse_swaps(["11:12", "3:5,7:8"]) == [(11, 12), (3, 5), (7, 8)]
    with pytest.raises(NanoqError, match=r"--drop 'x1': expected block indices like 10 or 3,4"):
        parse_indices(["x1"], "--drop")
    with pytest.raises(NanoqError, match=r"--swap '11-12': expected a pair of block indices like 11:12"):
        parse_swaps(["11-12"])
    with pytest.raises(NanoqError, match=r"--swap 5:5: a block cannot be swapped with itself"):
        parse_swaps(["5:5"])
