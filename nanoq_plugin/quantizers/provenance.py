"""Where a checkpoint came from: source model, recipe, calibration data, seed, date and package versions."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from .. import __version__
from ..example_model import MARKER_NAME as EXAMPLE_MARKER_NAME
from ..format.checkpoint import SourceCheckpoint
from .calibration import SELF
from .recipe import Recipe


def versions() -> dict:
    import safetensors
    import transformers

    return {
        "nanoq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def provenance(source: SourceCheckpoint, recipe: Recipe, calibration: str | None, calib_info: dict | None) -> dict:
    """The manifest's provenance; `calib_info` describes the calibration the method used (None: it used none)."""
    if calib_info is not None and calibration == SELF:
        calibration_entry = {"file": None, "self_generated": True, "used": True, **calib_info}
    elif calib_info is not None:
        calibration_entry = {"file": str(Path(calibration).resolve()), "used": True, **calib_info}
    elif calibration:
        calibration_entry = {"file": None if calibration == SELF else str(Path(calibration).resolve()),
                             "used": False, "note": f"{recipe.method} uses no calibration data "
                                                    "(the allocator's sensitivity pass may have: see allocation)"}
    else:
        calibration_entry = None
    record = {
        "source": str(source.directory.resolve()),
        "source_model": source.config.get("_name_or_path") or source.directory.name,
        "recipe": recipe.to_dict(),
        "calibration": calibration_entry,
        "seed": 0,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    marker = source.directory / EXAMPLE_MARKER_NAME
    if marker.exists():  # written by `nanoq example-model`: what its GGUF stored, and its license
        example = json.loads(marker.read_text(encoding="utf-8"))
        record["example_model_note"] = (f"{example.get('model', record['source_model'])} from {example['source_file']} "
                                         f"({example['license']}): {example['note']}")
    return record
