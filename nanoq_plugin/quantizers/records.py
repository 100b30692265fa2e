"""The manifest record of one quantized module: its schemes, shape, stored bytes and error."""

from __future__ import annotations

import torch

from ..format.layout import param_specs, stored_bytes
from ..format.manifest import ModuleRecord
from ..format.reference import dequantize
from ..format.schemes import Scheme, SchemeKind
from ..format.tensor_spec import row_steps
from .nvfp4 import packed_entropy_bits


def module_record(reference: torch.Tensor, source_dtype: torch.dtype, tensors: dict, scheme: Scheme,
                  requested: Scheme, restored: torch.Tensor | None = None) -> ModuleRecord:
    """The manifest record of a module stored as `tensors`; `reference [N, K]` is the float weight they encode
    (the source weight, times AWQ's scales where they were folded in); `restored` is their dequantization
    when the caller has it already. NVFP4 records also carry the entropy of the packed bytes."""
    if restored is None:
        restored = dequantize(tensors, scheme, *reference.shape)
    rel_error = (_difference_norm(restored, reference) / _difference_norm(reference).clamp_min(1e-30)).item()
    specs = param_specs(scheme, *reference.shape)
    record = ModuleRecord(scheme=scheme, requested_scheme=requested, shape=tuple(reference.shape),
                          source_dtype=source_dtype, stored_bytes=stored_bytes(specs), rel_error=rel_error,
                          tensors=specs)
    if scheme.kind is SchemeKind.NVFP4:
        record.packed_entropy_bits = packed_entropy_bits(tensors["qweight"])
    return record


def _difference_norm(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The Frobenius norm of `a - b` (of `a` alone without `b`) for `[N, K]` matrices of any float dtype and
    device, in float32 on `a`'s device, some rows at a time: no whole float32 copy or difference (an 8B
    gate_proj's is 235 MB)."""
    total = torch.zeros((), dtype=torch.float32, device=a.device)
    for start, end in row_steps(*a.shape):
        rows = a[start:end].to(torch.float32)
        if b is not None:
            rows = rows - b[start:end].to(device=a.device, dtype=torch.float32)
        total += rows.square().sum()
    return total.sqrt()
