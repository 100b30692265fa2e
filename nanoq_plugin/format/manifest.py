"""`nano_manifest.json`: per-tensor metadata, storage accounting and provenance.

Schema (format version 1):

    {"format_version": 1,
     "modules": {MODULE: {"scheme": "int4g64", "requested_scheme": "int4g128", "shape": [N, K],
                          "source_dtype": "bfloat16", "original_bytes": int, "stored_bytes": int,
                          "rel_error": float, "tensors": {NAME: {"dtype": "int32", "shape": [...]}},
                          "packed_entropy_bits": float (nvfp4 only)}},
     "float_tensors": {TENSOR: {"dtype": "bfloat16", "shape": [...], "bytes": int}},
     "totals": {"original_bytes", "stored_bytes", "ratio", "bits_per_weight", "params",
                "quantized_params", "quantized_original_bytes", "quantized_stored_bytes",
                "quantized_bits_per_weight", "packed_entropy_bits" (nvfp4 only)},
     "provenance": {"source", "recipe", "calibration", "seed", "created", "versions": {...}}}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TensorSpec
from .schemes import Scheme

MANIFEST_NAME = "nano_manifest.json"


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def spec_to_json(spec: TensorSpec) -> dict:
    return {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape)}


@dataclass
class ModuleRecord:
    """What the manifest records for one quantized module."""

    scheme: Scheme
    requested_scheme: Scheme
    shape: tuple[int, int]
    source_dtype: torch.dtype
    stored_bytes: int
    rel_error: float
    tensors: dict[str, TensorSpec]
    packed_entropy_bits: float | None = None  # nvfp4: Shannon entropy of the packed bytes (bits per byte)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def original_bytes(self) -> int:
        return self.params * self.source_dtype.itemsize

    def to_json(self) -> dict:
        return {
            "scheme": self.scheme.name,
            "requested_scheme": self.requested_scheme.name,
            "shape": list(self.shape),
            "source_dtype": dtype_name(self.source_dtype),
            "original_bytes": self.original_bytes,
            "stored_bytes": self.stored_bytes,
            "rel_error": round(self.rel_error, 6),
            "tensors": {name: spec_to_json(spec) for name, spec in self.tensors.items()},
            **({} if self.packed_entropy_bits is None else {"packed_entropy_bits": round(self.packed_entropy_bits, 4)}),
        }


def build_manifest(
    modules: dict[str, ModuleRecord], float_tensors: dict[str, TensorSpec], provenance: dict
) -> dict:
    """Assemble the manifest with totals computed from the records."""
    float_bytes = sum(_numel(s) * s.dtype.itemsize for s in float_tensors.values())
    float_params = sum(_numel(s) for s in float_tensors.values())
    q_params = sum(r.params for r in modules.values())
    q_original = sum(r.original_bytes for r in modules.values())
    q_stored = sum(r.stored_bytes for r in modules.values())
    original = q_original + float_bytes
    stored = q_stored + float_bytes
    params = q_params + float_params
    totals = {
        "params": params,
        "original_bytes": original,
        "stored_bytes": stored,
        "ratio": round(original / stored, 4) if stored else None,
        "bits_per_weight": round(8 * stored / params, 4) if params else None,
        "quantized_params": q_params,
        "quantized_original_bytes": q_original,
        "quantized_stored_bytes": q_stored,
        "quantized_bits_per_weight": round(8 * q_stored / q_params, 4) if q_params else None,
    }
    with_entropy = [r for r in modules.values() if r.packed_entropy_bits is not None]
    if with_entropy:  # params-weighted mean over the nvfp4 modules
        totals["packed_entropy_bits"] = round(
            sum(r.packed_entropy_bits * r.params for r in with_entropy) / sum(r.params for r in with_entropy), 4)
    return {
        "format_version": 1,
        "modules": {name: modules[name].to_json() for name in sorted(modules)},
        "float_tensors": {
            name: {**spec_to_json(s), "bytes": _numel(s) * s.dtype.itemsize} for name, s in sorted(float_tensors.items())
        },
        "totals": totals,
        "provenance": provenance,
    }


def _numel(spec: TensorSpec) -> int:
    count = 1
    for dim in spec.shape:
        count *= dim
    return count
