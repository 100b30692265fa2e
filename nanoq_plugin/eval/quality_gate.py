"""`--max-ppl-ratio`: refuse a quantized checkpoint whose perplexity is too far above its base's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..errors import NanoqError
from ..format.manifest import MANIFEST_NAME
from ..quantizers.calibration import calibration_windows
from .perplexity import evaluate_perplexity
from .reference_model import dequantized_float_model

GATE_WINDOWS = 16
GATE_SEED = 1  # calibration windows are drawn with seed 0: these are other windows of the same text


def check_quality_gate(source_dir: str | Path, output: str | Path, calibration: str, max_ppl_ratio: float,
                       seq_len: int = 512, windows: int = GATE_WINDOWS) -> dict:
    """Perplexity ratio of the nano checkpoint `output` to its base `source_dir` on `windows` windows of
    `seq_len` tokens drawn from `calibration` with another seed than calibration's. Records the result in the
    manifest's `provenance.quality_gate`; removes `output` and raises NanoqError when the ratio exceeds
    `max_ppl_ratio`."""
    from transformers import AutoModelForCausalLM

    output = Path(output)
    ids = calibration_windows(source_dir, calibration, windows, seq_len, seed=GATE_SEED).reshape(-1)
    models = {"base": AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval(),
              "quantized": dequantized_float_model(source_dir, output)}
    result = evaluate_perplexity(models, ids, seq_len, seq_len, windows, progress=False)
    ratio = result.perplexity["quantized"] / result.perplexity["base"]
    if not math.isfinite(ratio):
        shutil.rmtree(output)
        raise NanoqError(f"quality gate: perplexity ratio {ratio} to the base is not a finite number "
                         f"(quantized {result.perplexity['quantized']}, base {result.perplexity['base']}); "
                         "nothing written")
    if ratio > max_ppl_ratio:
        shutil.rmtree(output)
        raise NanoqError(f"quality gate: perplexity ratio {ratio:.4f} to the base exceeds --max-ppl-ratio "
                         f"{max_ppl_ratio} on {result.windows} held-out calibration windows; nothing written "
                         "(raise the size target or add candidates)")
    gate = {"ppl_ratio": round(ratio, 4), "max_ppl_ratio": max_ppl_ratio, "windows": result.windows,
            "text": "calibration text (self-generated)" if calibration == "self" else str(Path(calibration).resolve())}
    manifest_path = output / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["provenance"]["quality_gate"] = gate
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return gate
