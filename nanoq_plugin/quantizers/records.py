"""The manifest record of one quantized module: its schemes, shape, stored bytes and error."""

from __future__ import annotations

import torch

from ..format.layout import param_specs, stored_bytes
from ..format.manifest import ModuleRecord
from ..format.reference import dequantize
from ..format.schemes import Scheme, SchemeKind
from .nvfp4 import packed_entropy_bits


def module_record(reference: torch.Tensor, source_dtype: torch.dtype, tensors: dict, scheme: Scheme,
                  requested: Scheme, restored: torch.Tensor | None = None) -> ModuleRecord:
    """The manifest record of a module stored as `tensors`; `reference [N, K]` is the float weight they encode
    (the source weight, times AWQ's scales where they were folded in); `restored` is their dequantization
    when the caller has it already. NVFP4 records also carry the entropy of the packed bytes."""
    original = reference.to(torch.float32)
    owned = restored is None
    if owned:
        restored = dequantize(tensors, scheme, *original.shape)
    restored = restored.to(device=original.device, dtype=torch.float32)
    # the difference overwrites a dequantization made here, which no one else holds (an 8B gate_proj's float32
    # copy is 235 MB); a float scheme's dequantization may be the stored tensor itself
    in_place = owned and scheme.is_quantized
    difference = restored.sub_(original) if in_place else restored - original
    rel_error = (torch.linalg.norm(difference) / torch.linalg.norm(original).clamp_min(1e-30)).item()
    specs = param_specs(scheme, *original.shape)
    record = ModuleRecord(scheme=scheme, requested_scheme=requested, shape=tuple(original.shape),
                          source_dtype=source_dtype, stored_bytes=stored_bytes(specs), rel_error=rel_error,
                          tensors=specs)
    if scheme.kind is SchemeKind.NVFP4:
        record.packed_entropy_bits = packed_entropy_bits(tensors["qweight"])
    return record
