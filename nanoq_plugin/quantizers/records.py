"""The manifest record of one quantized module: its schemes, shape, stored bytes and error."""

from __future__ import annotations

import torch

from ..format.layout import param_specs, stored_bytes
from ..format.manifest import ModuleRecord
from ..format.reference import dequantize, gather_rows
from ..format.schemes import Scheme, SchemeKind
from ..format.tensor_spec import row_steps
from .nvfp4 import packed_entropy_bits


def module_record(reference: torch.Tensor, source_dtype: torch.dtype, tensors: dict, scheme: Scheme,
                  requested: Scheme, restored: torch.Tensor | None = None) -> ModuleRecord:
    """The manifest record of a module stored as `tensors`; `reference [N, K]` is the float weight they encode
    (the source weight, times AWQ's scales where they were folded in); `restored` is their dequantization
    when the caller has it already. NVFP4 records also carry the entropy of the packed bytes."""
    rel_error = _relative_error(reference, tensors, scheme, restored)
    specs = param_specs(scheme, *reference.shape)
    record = ModuleRecord(scheme=scheme, requested_scheme=requested, shape=tuple(reference.shape),
                          source_dtype=source_dtype, stored_bytes=stored_bytes(specs), rel_error=rel_error,
                          tensors=specs)
    if scheme.kind is SchemeKind.NVFP4:
        record.packed_entropy_bits = packed_entropy_bits(tensors["qweight"])
    return record


def _relative_error(reference: torch.Tensor, tensors: dict, scheme: Scheme, restored: torch.Tensor | None) -> float:
    """`‖restored - reference‖ / ‖reference‖` (Frobenius) for `reference [N, K]` of any float dtype, in float32,
    some output rows at a time: neither a whole float32 copy nor a whole difference is made, and without
    `restored` each step dequantizes only its rows of the stored tensors (an 8B embedding table's float32
    dequantization is 2.1 GB)."""
    n, k = reference.shape
    if restored is None and not scheme.is_quantized:  # a float scheme: its stored tensor is the weight
        restored = dequantize(tensors, scheme, n, k)
    error = total = torch.zeros((), dtype=torch.float32, device=reference.device)
    for start, end in row_steps(n, k):
        rows = reference[start:end].to(torch.float32)
        if restored is None:
            outputs = torch.arange(start, end, device=next(iter(tensors.values())).device)
            got = gather_rows(tensors, scheme, outputs, k)
        else:
            got = restored[start:end]
        error = error + (got.to(device=rows.device, dtype=torch.float32) - rows).square().sum()
        total = total + rows.square().sum()
    return (error.sqrt() / total.sqrt().clamp_min(1e-30)).item()
