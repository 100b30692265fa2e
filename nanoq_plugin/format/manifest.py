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
     "provenance": {"source", "recipe", "calibration", "seed", "created", "versions": {...}},
     "moe": {BLOCK_INDEX: {"num_experts": E, "top_k": k, "schemes": {ROLE: SCHEME},
                           "routed_tokens": [n_0, ..., n_{E-1}] (calibrated methods),
                           "floor": [experts calibrated on all tokens] (calibrated methods),
                           "floor_tokens": N (calibrated methods)}}   (mixture-of-experts models only)}

A mixture-of-experts block's expert projections are ordinary modules above (`...mlp.experts.7.gate_proj`);
`moe` says per block how many experts it has, how many each token goes to, the scheme of each role
(`gate_up_proj`: gate and up, `down_proj`) and, for calibrated methods, how many calibration tokens the model's
own router sent to each expert and which experts had fewer than `floor_tokens` and were calibrated on all tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import NanoqError

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
    modules: dict[str, ModuleRecord], float_tensors: dict[str, TensorSpec], provenance: dict,
    moe: dict | None = None,
) -> dict:
    """Assemble the manifest with totals computed from the records (`moe`: the per-block MoE section above)."""
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
        **({"moe": {str(block): moe[block] for block in sorted(moe)}} if moe else {}),
    }


def _numel(spec: TensorSpec) -> int:
    count = 1
    for dim in spec.shape:
        count *= dim
    return count


TOTALS_KEYS = ("params", "original_bytes", "stored_bytes", "ratio", "bits_per_weight", "quantized_params",
               "quantized_original_bytes", "quantized_stored_bytes", "quantized_bits_per_weight")
_COUNT_KEYS = ("params", "original_bytes", "stored_bytes", "quantized_params", "quantized_original_bytes",
               "quantized_stored_bytes")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_manifest(manifest: dict, where) -> None:
    """NanoqError naming `where` (the manifest's path) and the key at the first field missing or of the wrong
    type, so that every reader of the schema above can index it without further checks."""
    modules, floats, totals = manifest.get("modules"), manifest.get("float_tensors", {}), manifest.get("totals")
    if not isinstance(modules, dict):
        raise NanoqError(f"{where}: missing 'modules' (an object of module -> record)")
    for module, record in modules.items():
        at = f"{where}: module '{module}'"
        if not isinstance(record, dict):
            raise NanoqError(f"{at}: the record is not a JSON object")
        for key in ("scheme", "requested_scheme", "source_dtype"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise NanoqError(f"{at}: '{key}' is missing or not a name")
        shape = record.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(d) and d > 0 for d in shape)):
            raise NanoqError(f"{at}: 'shape' is {shape!r}, expected [out, in] (two positive integers)")
        for key in ("original_bytes", "stored_bytes"):
            if not _is_count(record.get(key)):
                raise NanoqError(f"{at}: '{key}' is {record.get(key)!r}, expected a byte count")
        if not _is_number(record.get("rel_error")) or record["rel_error"] < 0:
            raise NanoqError(f"{at}: 'rel_error' is {record.get('rel_error')!r}, expected a finite number >= 0")
        if not isinstance(record.get("tensors"), dict):
            raise NanoqError(f"{at}: 'tensors' is missing or not an object")
    if not isinstance(floats, dict):
        raise NanoqError(f"{where}: 'float_tensors' is not an object")
    for name, record in floats.items():
        if not (isinstance(record, dict) and isinstance(record.get("dtype"), str) and isinstance(record.get("shape"), list)
                and all(_is_count(d) for d in record["shape"]) and _is_count(record.get("bytes"))):
            raise NanoqError(f"{where}: float tensor '{name}' needs 'dtype', 'shape' and 'bytes', found {record!r}")
    if not isinstance(totals, dict):
        raise NanoqError(f"{where}: missing 'totals' (an object: {', '.join(TOTALS_KEYS)})")
    for key in TOTALS_KEYS:
        value = totals.get(key)
        valid = _is_count(value) if key in _COUNT_KEYS else (value is None or (_is_number(value) and value >= 0))
        if key not in totals or not valid:
            raise NanoqError(f"{where}: totals '{key}' is {value!r}, expected "
                             + ("a count" if key in _COUNT_KEYS else "a finite number or null"))
    if not isinstance(manifest.get("provenance", {}), dict):
        raise NanoqError(f"{where}: 'provenance' is not an object")
    moe = manifest.get("moe", {})
    if not isinstance(moe, dict):
        raise NanoqError(f"{where}: 'moe' is not an object")
    for block, record in moe.items():
        if not (isinstance(record, dict) and _is_count(record.get("num_experts")) and _is_count(record.get("top_k"))
                and isinstance(record.get("schemes"), dict)):
            raise NanoqError(f"{where}: moe block {block!r} needs 'num_experts', 'top_k' and 'schemes', found "
                             f"{str(record)[:120]}")
        routed = record.get("routed_tokens")
        if routed is not None and not (isinstance(routed, list) and len(routed) == record["num_experts"]
                                       and all(_is_count(n) for n in routed)):
            raise NanoqError(f"{where}: moe block {block!r}: 'routed_tokens' is not one count per expert")
