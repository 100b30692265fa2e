"""Check that a nano checkpoint's config, manifest and tensors agree, before anything loads it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NanoqError
from .checkpoint import SourceCheckpoint, read_json
from .expected_tensors import check_nano_tensors, model_tensors
from .expert_tensors import ExpertsModule
from .layout import check_shape_fits, param_specs
from .manifest import MANIFEST_NAME, check_manifest, dtype_name
from .quant_config import NanoQuantConfig


@dataclass
class NanoCheckpoint:
    """A validated nano checkpoint: its folder, parsed config, manifest and lazy tensor reader."""

    directory: Path
    quant_config: NanoQuantConfig
    manifest: dict
    tensors: SourceCheckpoint

    def module_shape(self, module: str) -> tuple[int, int]:
        """`[out, in]` of quantized `module`, from the manifest."""
        out_features, in_features = self.manifest["modules"][module]["shape"]
        return int(out_features), int(in_features)

    def experts_modules(self) -> tuple[ExpertsModule, ...]:
        """The MoE experts modules of the checkpoint's model (empty for a dense model), with the stored name of
        every expert projection (`format.expert_tensors`)."""
        return model_tensors(self.tensors.config, str(self.directory / "config.json")).experts

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The stored tensors of quantized `module` by their short names (`qweight`, `scales`, ...)."""
        scheme = self.quant_config.modules[module]
        names = [f"{module}.{name}" for name in param_specs(scheme, *self.module_shape(module))]
        return {name.rsplit(".", 1)[1]: tensor for name, tensor in self.tensors.items(names)}


def _describe(dtype_str: str, shape) -> str:
    return f"{dtype_str} {list(shape)}"


def load_nano_checkpoint(directory: str | os.PathLike) -> NanoCheckpoint:
    """Open and validate `directory`; raises NanoqError naming the file and tensor at the first problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NanoqError(f"{directory}: not a directory (a nano checkpoint is a folder)")
    config_path = directory / "config.json"
    config = read_json(config_path)
    if "quantization_config" not in config:
        raise NanoqError(f"{config_path}: no quantization_config: this is a float checkpoint, not a nano one")
    quant_config = NanoQuantConfig.from_dict(config["quantization_config"], f"{config_path}: quantization_config")
    manifest_path = directory / MANIFEST_NAME
    manifest = read_json(manifest_path)
    check_manifest(manifest, manifest_path)
    tensors = SourceCheckpoint(directory)
    records = manifest["modules"]

    for module, scheme in quant_config.modules.items():
        record = records.get(module)
        if record is None:
            raise NanoqError(f"{manifest_path}: module '{module}' is quantized in config.json but not in the manifest")
        if record.get("scheme") != scheme.name:
            raise NanoqError(
                f"{manifest_path}: module '{module}' has scheme {record.get('scheme')!r}, config.json says {scheme.name!r}"
            )
        try:
            out_features, in_features = (int(d) for d in record["shape"])
        except (KeyError, TypeError, ValueError):
            raise NanoqError(f"{manifest_path}: module '{module}' has no valid 'shape' [out, in]") from None
        check_shape_fits(scheme, out_features, in_features, f"{manifest_path}: module '{module}'")
        for name, spec in param_specs(scheme, out_features, in_features).items():
            full = f"{module}.{name}"
            expected = spec.describe()
            listed = record.get("tensors", {}).get(name)
            if listed != {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape)}:
                raise NanoqError(
                    f"{manifest_path}: tensor '{full}' is listed as {listed}, scheme {scheme.name} on "
                    f"[{out_features}, {in_features}] needs {expected}"
                )
            if full not in tensors:
                raise NanoqError(f"{directory}: tensor '{full}' is missing from the safetensors files")
            found = _describe(dtype_name(tensors.dtype(full)), tensors.shape(full))
            if found != expected:
                raise NanoqError(
                    f"{tensors.file_of(full)}: tensor '{full}' is {found}, the manifest and scheme "
                    f"{scheme.name} need {expected}"
                )
        if f"{module}.weight" in tensors:
            raise NanoqError(f"{tensors.file_of(module + '.weight')}: '{module}.weight' is stored beside the "
                             f"quantized tensors of a {scheme.name} module")

    if quant_config.tied_lm_head is not None and "lm_head.weight" in tensors:
        raise NanoqError(f"{tensors.file_of('lm_head.weight')}: 'lm_head.weight' is stored although config.json "
                         f"ties the LM head to the quantized '{quant_config.tied_lm_head}'")
    for module in records:
        if module not in quant_config.modules:
            raise NanoqError(f"{manifest_path}: module '{module}' is listed as quantized but config.json keeps it in float")
    for name, record in manifest.get("float_tensors", {}).items():
        if name not in tensors:
            raise NanoqError(f"{directory}: tensor '{name}' is missing from the safetensors files")
        found = _describe(dtype_name(tensors.dtype(name)), tensors.shape(name))
        listed = _describe(record.get("dtype"), record.get("shape", []))
        if found != listed:
            raise NanoqError(f"{tensors.file_of(name)}: tensor '{name}' is {found}, the manifest says {listed}")
    check_nano_tensors(tensors, quant_config, {module: records[module]["shape"] for module in quant_config.modules},
                       manifest_path)
    return NanoCheckpoint(directory, quant_config, manifest, tensors)


def verify_tensor_values(checkpoint: NanoCheckpoint) -> None:
    """Read every tensor of `checkpoint` once (streamed, one at a time): NanoqError naming the file, the tensor
    and the first bad index of a NaN or infinite value (`SourceCheckpoint.get` checks each)."""
    for name in checkpoint.tensors.keys():
        checkpoint.tensors.get(name)
