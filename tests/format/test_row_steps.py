"""Encoding, decoding, scale search and error records work a few rows at a time (`tensor_spec.row_steps`, bounded
temporaries at 8B): the result must not depend on the step."""

from __future__ import annotations

import pytest
import torch

from nanoq_plugin.format import tensor_spec
from nanoq_plugin.format.reference import compress, dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.format.tensor_spec import row_steps
from nanoq_plugin.quantizers.records import module_record
from nanoq_plugin.quantizers.rtn import quantize_rtn, rtn_scales


def test_row_steps_cover_the_rows_on_multiples():
    assert row_steps(10, 3, 1) == [(0, 10)]
    steps = row_steps(1000, tensor_spec.STEP_ELEMENTS // 64, 32)  # 64 rows a step
    assert steps[0] == (0, 64) and steps[-1] == (960, 1000) and len(steps) == 16
    assert all(start % 32 == 0 for start, _ in row_steps(4096, 10**9, 32))  # wider than a step: one block a step


@pytest.mark.parametrize("name", ["int4g128", "int3g32", "int2g64-asym", "int8g32-asym", "int8"])
def test_results_do_not_depend_on_the_step(name, monkeypatch):
    scheme = parse_scheme(name)
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[3, 17] = 0.9  # an outlier the clip search must weigh
    whole_scales = rtn_scales(weight, scheme, clip_search=True)
    whole = quantize_rtn(weight, scheme, clip_search=True)
    whole_restored = dequantize(whole, scheme, 96, 256)
    monkeypatch.setattr(tensor_spec, "STEP_ELEMENTS", 700)  # a step of a few rows (one 32-row block when packing)
    assert len(row_steps(96, 256)) > 10
    stepped_scales = rtn_scales(weight, scheme, clip_search=True)
    for got, want in zip(stepped_scales, whole_scales):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    stepped = compress(weight, scheme, *whole_scales)
    assert stepped.keys() == whole.keys()
    for part in whole:
        assert torch.equal(stepped[part], whole[part]), part
    assert torch.equal(dequantize(stepped, scheme, 96, 256), whole_restored)
    record = module_record(weight.to(torch.bfloat16), torch.bfloat16, stepped, scheme, scheme)
    expected = torch.linalg.norm(whole_restored - weight.to(torch.bfloat16).float()) / torch.linalg.norm(
        weight.to(torch.bfloat16).float())
    assert record.rel_error == pytest.approx(expected.item(), rel=1e-5)
