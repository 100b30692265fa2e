"""The `quantization_config` block of a nano checkpoint's config.json (format version 1).

    {"quant_method": "nano", "format_version": 1,
     "schemes": {"int4g128": {"kind": "int_group", "bits": 4, "group_size": 128, "symmetric": true}, ...},
     "modules": {"model.layers.0.self_attn.q_proj": "int4g128", ...}}

`modules` names every quantized module explicitly (no patterns): engines never guess. A module that is
absent is stored in float under its usual `weight` name. A quantized embedding table `[V, H]` is stored
like a linear with V outputs and H inputs. `"tied_lm_head": "model.embed_tokens"` (optional) says the LM
head computes its logits with that quantized table: the checkpoint stores no `lm_head` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NanoqError
from .schemes import Scheme

QUANT_METHOD = "nano"
FORMAT_VERSION = 1


@dataclass
class NanoQuantConfig:
    """Resolved map from module name to scheme, plus the schemes by canonical name."""

    modules: dict[str, Scheme] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tied_lm_head: str | None = None

    def scheme_of(self, module: str) -> Scheme | None:
        """The scheme of `module`, or None where it is stored in float."""
        return self.modules.get(module)

    def to_dict(self) -> dict:
        """JSON form; modules sorted by name so the file is stable."""
        schemes = {s.name: s.to_dict() for s in sorted(set(self.modules.values()), key=lambda s: s.name)}
        out = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "schemes": schemes,
            "modules": {name: self.modules[name].name for name in sorted(self.modules)},
        }
        if self.tied_lm_head is not None:
            out["tied_lm_head"] = self.tied_lm_head
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization_config") -> "NanoQuantConfig":
        """Parse and validate; `where` (e.g. the config.json path) prefixes every error message."""
        if not isinstance(data, dict) or data.get("quant_method") != QUANT_METHOD:
            method = data.get("quant_method") if isinstance(data, dict) else None
            raise NanoqError(f"{where}: not a nano checkpoint (quant_method is {method!r}, expected 'nano')")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise NanoqError(f"{where}: format_version {version!r} is not supported (this nanoq reads {FORMAT_VERSION})")
        raw_schemes, raw_modules = data.get("schemes"), data.get("modules")
        if not isinstance(raw_schemes, dict) or not isinstance(raw_modules, dict):
            raise NanoqError(f"{where}: 'schemes' and 'modules' must be JSON objects")
        schemes = {name: Scheme.from_dict(spec, f"{where}: scheme '{name}'") for name, spec in raw_schemes.items()}
        modules = {}
        for module, name in raw_modules.items():
            if name not in schemes:
                raise NanoqError(
                    f"{where}: module '{module}' uses unknown scheme '{name}' (defined: {', '.join(sorted(schemes))})"
                )
            modules[module] = schemes[name]
        tied = data.get("tied_lm_head")
        if tied is not None and tied not in modules:
            raise NanoqError(f"{where}: tied_lm_head names '{tied}', which is not a quantized module")
        return cls(modules=modules, format_version=version, tied_lm_head=tied)
