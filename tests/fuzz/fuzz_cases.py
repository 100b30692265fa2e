"""The broken inputs of the fuzz suite: each case breaks a copy of a tiny model, a nano checkpoint, a recipe,
a flag or the output path, and names the commands that must refuse it.

A case is data: a name, its class of breakage, what it breaks (`float`: the float model every float command
reads; `nano`: a nano checkpoint), the base it starts from, the commands it goes through, a `mutate` that
breaks the workspace's copy, and optionally the argv a command runs instead of its default one and a fragment
the error line must contain.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FLOAT_COMMANDS = ("quantize", "export-gguf", "surgery", "eval-base")
NANO_COMMANDS = ("inspect", "eval", "export-ct", "from_pretrained")
EVAL_WINDOWS = ("--ctx", "32", "--stride", "32", "--max-windows", "2")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MANIFEST = "nano_manifest.json"


@dataclass
class Workspace:
    """One run's copies: the float model, the nano checkpoint, a text file, and where the output goes."""

    root: Path
    src: Path
    nano: Path
    text: Path
    out: Path
    gguf: Path  # a GGUF export of the float llama

    @property
    def gguf_out(self) -> Path:
        return self.out.with_name(self.out.name + ".gguf")


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    breaks: str  # "float" or "nano": which input `mutate` breaks (and the default commands)
    mutate: Callable[[Workspace], None] | None = None
    commands: tuple[str, ...] = ()
    float_base: str = "llama"  # llama | qwen3-tied
    nano_base: str = "w4"  # w4 (llama, int4g128) | tied (qwen3, w8a8-embed) | nvfp4 (llama)
    argv: dict[str, Callable[[Workspace], list]] = field(default_factory=dict)
    expect: str = ""

    @property
    def runs(self) -> tuple[str, ...]:
        return self.commands or (FLOAT_COMMANDS if self.breaks == "float" else NANO_COMMANDS)


# ---- ways to break files ----

def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(edit: Callable[[dict], None], file: str = WEIGHTS) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        header, body = read_header(folder / file)
        edit(header)
        write_header(folder / file, header, body)
    return apply


def edit_tensors(edit: Callable[[dict], None], file: str = WEIGHTS) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(str(folder / file))
        edit(tensors)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    return apply


def edit_json(edit: Callable[[dict], object], file: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        result = edit(data)
        (folder / file).write_text(json.dumps(data if result is None else result))
    return apply


def raw_bytes(edit: Callable[[bytes], bytes], file: str = WEIGHTS) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / file).write_bytes(edit((folder / file).read_bytes()))
    return apply


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def put(name: str, index: tuple, value: float):
    def edit(tensors: dict) -> None:
        tensor = tensors[name].clone()
        tensor[index] = value
        tensors[name] = tensor
    return edit


def drop(*names: str):
    def edit(tensors: dict) -> None:
        for name in list(tensors):
            if any(name == n or (n.endswith(".") and name.startswith(n)) for n in names):
                del tensors[name]
    return edit


def set_tensor(name: str, make: Callable[[dict], torch.Tensor]):
    def edit(tensors: dict) -> None:
        tensors[name] = make(tensors)
    return edit


def set_dtype(name: str, dtype: str, shape: list | None = None):
    def edit(header: dict) -> None:
        header[name]["dtype"] = dtype
        if shape is not None:
            header[name]["shape"] = shape
    return edit


def set_shape(name: str, shape: list):
    def edit(header: dict) -> None:
        header[name]["shape"] = shape
    return edit


def config_set(**values):
    def edit(config: dict) -> None:
        config.update(values)
    return edit


def on(folder_of: Callable[[Workspace], Path], *steps: Callable[[Path], None]) -> Callable[[Workspace], None]:
    def mutate(ws: Workspace) -> None:
        for step in steps:
            step(folder_of(ws))
    return mutate


def src(*steps):
    return on(lambda ws: ws.src, *steps)


def nano(*steps):
    return on(lambda ws: ws.nano, *steps)


def shard(folder: Path, extra: dict | None = None) -> None:
    """Rewrite the folder as one shard with an index (`extra` edits the index's weight_map)."""
    (folder / WEIGHTS).rename(folder / "model-00001-of-00001.safetensors")
    header, _ = read_header(folder / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in header if name != "__metadata__"}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_index(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        shard(folder)
        index = json.loads((folder / INDEX).read_text())
        edit(index)
        (folder / INDEX).write_text(json.dumps(index))
    return apply


# ---- the cases ----

Q = "model.layers.0.self_attn.q_proj"
GATE = "model.layers.0.mlp.gate_proj"
UP1 = "model.layers.1.mlp.up_proj"
DOWN = "model.layers.1.mlp.down_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
NORM = "model.layers.0.input_layernorm.weight"


def byte_level() -> list[Case]:
    def header_not(payload: bytes):
        def edit(data: bytes) -> bytes:
            length = header_length(data)
            return data[:8] + payload.ljust(length, b" ") + data[8 + length:]
        return edit

    def offsets_past_end(header: dict) -> None:
        name = next(n for n in header if n != "__metadata__")
        header[name]["data_offsets"][1] += 64

    def offsets_overlap(header: dict) -> None:
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])

    def random_bytes(_: bytes) -> bytes:
        return random.Random(21).randbytes(4096)

    def directory(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        (folder / WEIGHTS).mkdir()

    variants = [
        ("empty-file", raw_bytes(lambda d: b"")),
        ("seven-bytes", raw_bytes(lambda d: d[:7])),
        ("header-only", raw_bytes(lambda d: d[:8 + header_length(d)])),
        ("cut-in-half", raw_bytes(lambda d: d[:len(d) // 2])),
        ("last-byte-missing", raw_bytes(lambda d: d[:-1])),
        ("huge-header-length", raw_bytes(lambda d: struct.pack("<Q", 2**40) + d[8:])),
        ("header-length-past-end", raw_bytes(lambda d: struct.pack("<Q", len(d)) + d[8:])),
        ("header-garbage", raw_bytes(lambda d: d[:8] + b"\x00garbage" + d[16:])),
        ("header-not-an-object", raw_bytes(header_not(b"[]"))),
        ("header-not-utf8", raw_bytes(header_not(b'{"\xff\xfe": 1}'))),
        ("header-blank", raw_bytes(header_not(b""))),
        ("offsets-past-end", edit_header(offsets_past_end)),
        ("offsets-overlap", edit_header(offsets_overlap)),
        ("random-bytes", raw_bytes(random_bytes)),
        ("a-directory", directory),
    ]
    cases = []
    for name, step in variants:
        cases.append(Case(f"float-{name}", "safetensors bytes", "float", src(step)))
        cases.append(Case(f"nano-{name}", "safetensors bytes", "nano", nano(step)))
    return cases


def header_lies() -> list[Case]:
    return [
        Case("dtype-int16-on-a-weight", "header lies", "float", src(edit_header(set_dtype(f"{Q}.weight", "I16"))),
             expect=f"{Q}.weight"),
        Case("dtype-int32-same-bytes", "header lies", "float",
             src(edit_header(set_dtype(f"{Q}.weight", "I32", [128, 64]))), expect=f"{Q}.weight"),
        Case("dtype-uint8-on-a-norm", "header lies", "float", src(edit_header(set_dtype(NORM, "U8", [256]))),
             expect=NORM),
        Case("dtype-f32-same-bytes", "header lies", "float",
             src(edit_header(set_dtype(f"{GATE}.weight", "F32", [128, 128]))), expect=f"{GATE}.weight"),
        Case("shape-transposed", "header lies", "float", src(edit_header(set_shape(f"{GATE}.weight", [128, 256]))),
             expect=f"{GATE}.weight"),
        Case("shape-flattened", "header lies", "float",
             src(edit_header(set_shape("model.layers.0.self_attn.o_proj.weight", [16384]))),
             expect="o_proj.weight"),
        Case("shape-disagrees-with-bytes", "header lies", "float", src(edit_header(set_shape(f"{Q}.weight", [128, 129])))),
        Case("dtype-unknown", "header lies", "float", src(edit_header(set_dtype(f"{Q}.weight", "Q4")))),
        Case("nano-qweight-as-float32", "header lies", "nano", nano(edit_header(set_dtype(f"{Q}.qweight", "F32"))),
             expect=f"{Q}.qweight"),
        Case("nano-scales-as-bfloat16", "header lies", "nano", nano(edit_header(set_dtype(f"{Q}.scales", "BF16"))),
             expect=f"{Q}.scales"),
        Case("nano-scales-transposed", "header lies", "nano", nano(edit_header(set_shape(f"{Q}.scales", [128, 1]))),
             expect=f"{Q}.scales"),
        Case("nano-qweight-flattened", "header lies", "nano", nano(edit_header(set_shape(f"{Q}.qweight", [2048]))),
             expect=f"{Q}.qweight"),
        Case("nano-norm-as-int16", "header lies", "nano", nano(edit_header(set_dtype(NORM, "I16"))), expect=NORM),
    ]


def non_finite() -> list[Case]:
    nan, inf = float("nan"), float("inf")

    def as_float32(tensors: dict) -> None:
        for name in tensors:
            tensors[name] = tensors[name].to(torch.float32)

    return [
        Case("nan-in-q_proj", "non-finite", "float", src(edit_tensors(put(f"{Q}.weight", (3, 5), nan))),
             expect=f"'{Q}.weight' has a non-finite value (nan) at index [3, 5]"),
        Case("inf-in-embedding", "non-finite", "float",
             src(edit_tensors(put("model.embed_tokens.weight", (7, 1), inf))), expect="model.embed_tokens.weight"),
        Case("minus-inf-in-lm_head", "non-finite", "float", src(edit_tensors(put("lm_head.weight", (0, 0), -inf))),
             expect="lm_head.weight"),
        Case("nan-in-a-norm", "non-finite", "float", src(edit_tensors(put(NORM, (10,), nan))), expect=NORM),
        Case("nan-in-final-norm", "non-finite", "float", src(edit_tensors(put("model.norm.weight", (0,), nan))),
             expect="model.norm.weight"),
        Case("nan-in-a-float32-source", "non-finite", "float",
             src(edit_tensors(as_float32), edit_tensors(put(f"{DOWN0}.weight", (1, 2), nan))), expect=f"{DOWN0}.weight"),
        Case("nan-in-qwen3-q_norm", "non-finite", "float",
             src(edit_tensors(put("model.layers.0.self_attn.q_norm.weight", (4,), nan))), float_base="qwen3-tied",
             nano_base="tied", expect="q_norm.weight"),
        Case("1e30-in-down_proj", "non-finite", "float", src(edit_tensors(put(f"{DOWN}.weight", (2, 3), 1e30))),
             commands=("quantize", "export-gguf"), expect=f"{DOWN}"),
        Case("70000-in-q_proj-for-f16", "non-finite", "float", src(edit_tensors(put(f"{Q}.weight", (0, 1), 7e4))),
             commands=("export-gguf",), expect=f"{Q}.weight"),
        Case("nano-nan-in-scales", "non-finite", "nano", nano(edit_tensors(put(f"{Q}.scales", (0, 3), nan))),
             expect=f"'{Q}.scales' has a non-finite value (nan) at index [0, 3]"),
        Case("nano-inf-in-scales", "non-finite", "nano", nano(edit_tensors(put(f"{UP1}.scales", (0, 0), inf))),
             expect=f"{UP1}.scales"),
        Case("nano-nan-in-a-norm", "non-finite", "nano", nano(edit_tensors(put(NORM, (5,), nan))), expect=NORM),
        Case("nano-nan-in-embedding", "non-finite", "nano",
             nano(edit_tensors(put("model.embed_tokens.weight", (1, 1), nan))), expect="model.embed_tokens.weight"),
        Case("nano-minus-inf-in-lm_head", "non-finite", "nano", nano(edit_tensors(put("lm_head.weight", (3, 3), -inf))),
             expect="lm_head.weight"),
        Case("nano-nan-in-fp8-scales", "non-finite", "nano", nano(edit_tensors(put(f"{Q}.scales", (1, 1), nan))),
             nano_base="nvfp4", expect=f"{Q}.scales"),
        Case("nano-nan-in-global-scale", "non-finite", "nano", nano(edit_tensors(put(f"{Q}.global_scale", (0,), nan))),
             nano_base="nvfp4", expect=f"{Q}.global_scale"),
        Case("quality-gate-on-a-huge-norm", "non-finite", "float",
             src(edit_tensors(put("model.norm.weight", (0,), 3e38))), commands=("quantize",),
             argv={"quantize": lambda ws: ["quantize", ws.src, ws.out, "--recipe", "w8", "--quiet", "--calib", ws.text,
                                           "--calib-seq-len", "32", "--max-ppl-ratio", "2"]},
             expect="not a finite number"),
        Case("nano-huge-final-norm", "non-finite", "nano", nano(edit_tensors(put("model.norm.weight", (0,), 3e38))),
             commands=("eval",), expect="perplexity"),
        Case("nano-nan-in-tied-table-scales", "non-finite", "nano",
             nano(edit_tensors(put("model.embed_tokens.scales", (9,), nan))), nano_base="tied",
             expect="model.embed_tokens.scales"),
    ]


def missing_and_extra() -> list[Case]:
    def copy_block(tensors: dict) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            tensors[name.replace("layers.1.", "layers.2.")] = tensors[name].clone()

    def weight_beside(tensors: dict) -> None:
        tensors[f"{Q}.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)

    def tied_head(tensors: dict) -> None:
        tensors["lm_head.weight"] = torch.zeros(320, 128, dtype=torch.bfloat16)

    extra = set_tensor("model.layers.0.mlp.extra.weight", lambda t: torch.zeros(4, 4, dtype=torch.bfloat16))
    return [
        Case("missing-final-norm", "missing/extra", "float", src(edit_tensors(drop("model.norm.weight"))),
             expect="'model.norm.weight' is missing"),
        Case("missing-untied-lm_head", "missing/extra", "float", src(edit_tensors(drop("lm_head.weight"))),
             expect="'lm_head.weight' is missing"),
        Case("missing-embedding", "missing/extra", "float", src(edit_tensors(drop("model.embed_tokens.weight"))),
             expect="model.embed_tokens.weight"),
        Case("missing-a-linear", "missing/extra", "float", src(edit_tensors(drop(f"{UP1}.weight"))),
             expect=f"'{UP1}.weight' is missing"),
        Case("missing-a-block-norm", "missing/extra", "float",
             src(edit_tensors(drop("model.layers.1.post_attention_layernorm.weight"))),
             expect="post_attention_layernorm.weight"),
        Case("missing-a-whole-block", "missing/extra", "float", src(edit_tensors(drop("model.layers.1."))),
             expect="model.layers.1."),
        Case("missing-qwen3-k_norm", "missing/extra", "float",
             src(edit_tensors(drop("model.layers.0.self_attn.k_norm.weight"))), float_base="qwen3-tied",
             nano_base="tied", expect="k_norm.weight"),
        Case("extra-tensor-in-a-block", "missing/extra", "float", src(edit_tensors(extra)), expect="mlp.extra.weight"),
        Case("extra-unknown-tensor", "missing/extra", "float",
             src(edit_tensors(set_tensor("foo.bar", lambda t: torch.ones(3)))), expect="'foo.bar'"),
        Case("extra-block", "missing/extra", "float", src(edit_tensors(copy_block)), expect="model.layers.2."),
        Case("nano-missing-qweight", "missing/extra", "nano", nano(edit_tensors(drop(f"{GATE}.qweight"))),
             expect=f"'{GATE}.qweight' is missing"),
        Case("nano-missing-scales", "missing/extra", "nano", nano(edit_tensors(drop(f"{DOWN}.scales"))),
             expect=f"{DOWN}.scales"),
        Case("nano-missing-a-norm", "missing/extra", "nano", nano(edit_tensors(drop(NORM))), expect=NORM),
        Case("nano-missing-lm_head", "missing/extra", "nano", nano(edit_tensors(drop("lm_head.weight"))),
             expect="lm_head.weight"),
        Case("nano-missing-a-whole-block", "missing/extra", "nano", nano(edit_tensors(drop("model.layers.1."))),
             expect="model.layers.1."),
        Case("nano-extra-tensor", "missing/extra", "nano", nano(edit_tensors(extra)), expect="mlp.extra.weight"),
        Case("nano-weight-beside-qweight", "missing/extra", "nano", nano(edit_tensors(weight_beside)),
             expect=f"{Q}.weight"),
        Case("nano-tied-head-stored", "missing/extra", "nano", nano(edit_tensors(tied_head)), nano_base="tied",
             expect="lm_head.weight"),
    ]


def config_disagreements() -> list[Case]:
    config = "config.json"

    def transposed(tensors: dict) -> None:
        tensors[f"{GATE}.weight"] = tensors[f"{GATE}.weight"].t().contiguous()

    def unlink(name: str):
        return lambda folder: (folder / name).unlink()

    def write(name: str, text: str):
        return lambda folder: (folder / name).write_text(text)

    def tie_to_up_proj(cfg: dict) -> None:
        cfg["quantization_config"]["tied_lm_head"] = "model.layers.0.mlp.up_proj"

    def quantize_a_ghost(folder: Path) -> None:
        edit_json(lambda c: c["quantization_config"]["modules"].update({"model.layers.7.mlp.up_proj": "int4g128"}),
                  config)(folder)
        edit_json(lambda m: m["modules"].update({"model.layers.7.mlp.up_proj": m["modules"][f"{UP1}"]}),
                  MANIFEST)(folder)

    def quantization(**values):
        return edit_json(lambda c: c["quantization_config"].update(values), config)

    def other_scheme(cfg: dict) -> None:
        quant = cfg["quantization_config"]
        quant["schemes"]["int8"] = {"kind": "int8_channel", "bits": 8, "group_size": 0, "symmetric": True}
        quant["modules"][f"{GATE}"] = "int8"

    cases = [
        ("hidden-size", config_set(hidden_size=96), "hidden_size 96"),
        ("intermediate-size", config_set(intermediate_size=512), "intermediate_size 512"),
        ("head-count", config_set(num_attention_heads=3), ""),
        ("kv-head-count", config_set(num_key_value_heads=4), "k_proj"),
        ("vocab-size", config_set(vocab_size=400), "vocab_size 400"),
        ("more-layers-than-stored", config_set(num_hidden_layers=3), "model.layers.2."),
        ("fewer-layers-than-stored", config_set(num_hidden_layers=1), "model.layers.1."),
        ("head-dim", config_set(head_dim=64), ""),
        ("model-type-needs-biases", config_set(model_type="qwen2"), "bias"),
        ("model-type-unsupported", config_set(model_type="gpt2"), "gpt2"),
        ("layers-not-a-number", config_set(num_hidden_layers="two"), ""),
        ("unknown-activation", config_set(hidden_act="nope"), ""),
        ("zero-heads", config_set(num_attention_heads=0), ""),
    ]
    out = [Case(f"config-{name}", "config vs tensors", "float", src(edit_json(step, config)), expect=expect)
           for name, step, expect in cases]
    out += [
        Case("config-untied-but-no-head", "config vs tensors", "float",
             src(edit_json(config_set(tie_word_embeddings=False), config)), float_base="qwen3-tied", nano_base="tied",
             expect="lm_head.weight"),
        Case("config-missing", "config vs tensors", "float", src(unlink(config)), expect="config.json"),
        Case("config-not-json", "config vs tensors", "float", src(write(config, "{model_type: llama")),
             expect="not valid JSON"),
        Case("config-a-list", "config vs tensors", "float", src(write(config, "[1, 2]")), expect="JSON object"),
        Case("gate_proj-transposed", "config vs tensors", "float", src(edit_tensors(transposed)),
             expect=f"{GATE}.weight"),
        Case("nano-tied-head-names-up_proj", "config vs tensors", "nano", nano(edit_json(tie_to_up_proj, config)),
             nano_base="tied", expect="up_proj"),
        Case("nano-quantizes-a-ghost-module", "config vs tensors", "nano", nano(quantize_a_ghost),
             expect="model.layers.7.mlp.up_proj"),
        Case("nano-hidden-size", "config vs tensors", "nano", nano(edit_json(config_set(hidden_size=96), config))),
        Case("nano-more-layers-than-stored", "config vs tensors", "nano",
             nano(edit_json(config_set(num_hidden_layers=3), config)), expect="model.layers.2."),
        Case("nano-vocab-size", "config vs tensors", "nano", nano(edit_json(config_set(vocab_size=400), config))),
        Case("nano-head-count", "config vs tensors", "nano", nano(edit_json(config_set(num_key_value_heads=4), config))),
        Case("nano-quant-method", "config vs tensors", "nano", nano(quantization(quant_method="gptq")),
             commands=("inspect", "eval", "export-ct")),  # transformers then loads it as GPTQ, not through nanoq
        Case("nano-format-version", "config vs tensors", "nano", nano(quantization(format_version=2))),
        Case("nano-unknown-scheme-name", "config vs tensors", "nano",
             nano(edit_json(lambda c: c["quantization_config"]["modules"].update({f"{GATE}": "int5g7"}), config))),
        Case("nano-config-scheme-differs", "config vs tensors", "nano", nano(edit_json(other_scheme, config)),
             expect=GATE),
    ]
    return out


def manifest_corruption() -> list[Case]:
    module = f"{UP1}"

    def record(**values):
        def edit(m: dict) -> None:
            for key, value in values.items():
                if value is ...:
                    del m["modules"][module][key]
                else:
                    m["modules"][module][key] = value
        return edit

    def top(key: str, value=...):
        def edit(m: dict) -> None:
            if value is ...:
                del m[key]
            else:
                m[key] = value
        return edit

    def totals(**values):
        def edit(m: dict) -> None:
            for key, value in values.items():
                if value is ...:
                    del m["totals"][key]
                else:
                    m["totals"][key] = value
        return edit

    def raw(replace: tuple[str, str]):
        def apply(folder: Path) -> None:
            text = (folder / MANIFEST).read_text()
            assert replace[0] in text
            (folder / MANIFEST).write_text(text.replace(replace[0], replace[1], 1))
        return apply

    def first_float(edit):
        def apply(m: dict) -> None:
            edit(m["float_tensors"][sorted(m["float_tensors"])[0]])
        return apply

    steps = [
        ("totals-missing", edit_json(top("totals"), MANIFEST), "totals"),
        ("modules-missing", edit_json(top("modules"), MANIFEST), "modules"),
        ("rel_error-missing", edit_json(record(rel_error=...), MANIFEST), "rel_error"),
        ("requested_scheme-missing", edit_json(record(requested_scheme=...), MANIFEST), "requested_scheme"),
        ("rel_error-nan", edit_json(record(rel_error=0.123456789), MANIFEST), ""),
        ("rel_error-infinity", edit_json(record(rel_error=0.123456789), MANIFEST), ""),
        ("rel_error-a-string", edit_json(record(rel_error="small"), MANIFEST), "rel_error"),
        ("rel_error-negative", edit_json(record(rel_error=-1), MANIFEST), "rel_error"),
        ("shape-missing", edit_json(record(shape=...), MANIFEST), "shape"),
        ("shape-one-dim", edit_json(record(shape=[128]), MANIFEST), "shape"),
        ("shape-wrong", edit_json(record(shape=[128, 256]), MANIFEST), module),
        ("stored_bytes-a-string", edit_json(record(stored_bytes="many"), MANIFEST), "stored_bytes"),
        ("record-not-an-object", edit_json(lambda m: m["modules"].update({module: 7}), MANIFEST), module),
        ("modules-a-list", edit_json(top("modules", []), MANIFEST), "modules"),
        ("scheme-differs", edit_json(record(scheme="int8"), MANIFEST), module),
        ("tensors-entry-wrong", edit_json(
            lambda m: m["modules"][module]["tensors"]["qweight"].update(shape=[1, 1]), MANIFEST), module),
        ("totals-key-missing", edit_json(totals(ratio=...), MANIFEST), "ratio"),
        ("totals-a-string", edit_json(totals(stored_bytes="big"), MANIFEST), "stored_bytes"),
        ("float-entry-no-bytes", edit_json(first_float(lambda r: r.pop("bytes")), MANIFEST), ""),
        ("float-entry-wrong-dtype", edit_json(first_float(lambda r: r.update(dtype="float16")), MANIFEST), ""),
        ("float_tensors-a-list", edit_json(top("float_tensors", []), MANIFEST), "float_tensors"),
        ("provenance-a-string", edit_json(top("provenance", "me"), MANIFEST), "provenance"),
        ("not-json", lambda f: (f / MANIFEST).write_text("{'modules': }"), "not valid JSON"),
        ("empty-file", lambda f: (f / MANIFEST).write_text(""), "not valid JSON"),
        ("a-list", lambda f: (f / MANIFEST).write_text("[]"), "JSON object"),
        ("missing", lambda f: (f / MANIFEST).unlink(), "not found"),
    ]
    cases = []
    for name, step, expect in steps:
        if name == "rel_error-nan":
            step = [step, raw(("0.123456789", "NaN"))]
        elif name == "rel_error-infinity":
            step = [step, raw(("0.123456789", "Infinity"))]
        else:
            step = [step]
        cases.append(Case(f"manifest-{name}", "manifest", "nano", nano(*step), expect=expect))
    return cases


def index_paths() -> list[Case]:
    def outside(relative: bool):
        def apply(folder: Path) -> None:
            shard(folder)
            name = "model-00001-of-00001.safetensors"
            copy = folder.parent / "outside.safetensors"
            copy.write_bytes((folder / name).read_bytes())
            index = json.loads((folder / INDEX).read_text())
            target = "../outside.safetensors" if relative else str(copy)
            index["weight_map"]["model.norm.weight"] = target
            (folder / INDEX).write_text(json.dumps(index))
        return apply

    def remove_entry(index: dict) -> None:
        del index["weight_map"]["model.norm.weight"]

    steps = [
        ("index-parent-path", outside(True), "outside the model folder"),
        ("index-absolute-path", outside(False), "outside the model folder"),
        ("index-missing-shard", edit_index(lambda i: i["weight_map"].update({"model.norm.weight": "gone.safetensors"})),
         "gone.safetensors"),
        ("index-no-weight_map", edit_index(lambda i: i.pop("weight_map")), "weight_map"),
        ("index-name-not-a-string", edit_index(lambda i: i["weight_map"].update({"model.norm.weight": 7})),
         "model.norm.weight"),
        ("index-lists-a-ghost", edit_index(lambda i: i["weight_map"].update({"ghost.weight": "model-00001-of-00001.safetensors"})),
         "ghost.weight"),
        ("index-omits-a-tensor", edit_index(remove_entry), "model.norm.weight"),
        ("index-not-json", lambda f: (shard(f), (f / INDEX).write_text("{")), "not valid JSON"),
    ]
    cases = []
    for name, step, expect in steps:
        cases.append(Case(f"float-{name}", "index paths", "float", src(step), expect=expect))
        cases.append(Case(f"nano-{name}", "index paths", "nano", nano(step), expect=expect))
    return cases


def bad_recipes() -> list[Case]:
    def recipe(text: str | bytes):
        def mutate(ws: Workspace) -> None:
            path = ws.root / "recipe.yaml"
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return mutate

    def quantize_with_recipe(ws: Workspace) -> list:
        return ["quantize", ws.src, ws.out, "--recipe", ws.root / "recipe.yaml", "--quiet"]

    texts = [
        ("unknown-scheme", "default: int6g64\n", "int6g64"),
        ("unknown-rule-scheme", "default: int4g128\nrules:\n  - 'down_proj': int6g64\n", "int6g64"),
        ("yaml-syntax", "default: [int4g128\n", "YAML"),
        ("a-list", "- int4g128\n", "mapping"),
        ("empty", "", ""),
        ("unknown-key", "default: int4g128\ncolour: blue\n", "colour"),
        ("bad-regex", "default: int4g128\nrules:\n  - '(down_proj': int8\n", ""),
        ("unknown-method", "default: int4g128\nmethod: magic\n", "magic"),
        ("binary", b"\x00\xff\xfe\x00garbage", ""),
        ("rules-not-a-list", "default: int4g128\nrules: 7\n", ""),
        ("group-does-not-divide", "default: int4g96\n", ""),
        ("nvfp4-alpha-text", "default: nvfp4\nnvfp4_alpha: lots\n", ""),
        ("nvfp4-alpha-nan", "default: nvfp4\nnvfp4_alpha: .nan\n", ""),
        ("embeddings-unknown", "default: int4g128\nembeddings: int9\n", "int9"),
    ]
    cases = [Case(f"recipe-{name}", "bad recipe", "float", recipe(text), commands=("quantize",),
                  argv={"quantize": quantize_with_recipe}, expect=expect) for name, text, expect in texts]
    cases.append(Case("recipe-missing-file", "bad recipe", "float", None, commands=("quantize",),
                      argv={"quantize": lambda ws: ["quantize", ws.src, ws.out, "--recipe", ws.root / "no.yaml"]},
                      expect="no.yaml"))
    return cases


def bad_flags() -> list[Case]:
    def quantize(*flags):
        return {"quantize": lambda ws: ["quantize", ws.src, ws.out, "--recipe", "w8", "--quiet", *flags]}

    def eval_(*flags, base: bool = False):
        def argv(ws: Workspace) -> list:
            args = ["eval", ws.nano, "--text", ws.text, "--quiet"]
            if base:
                args += ["--base", ws.src]
            return args + [*flags]
        return {"eval": argv}

    def surgery(*flags):
        return {"surgery": lambda ws: ["surgery", ws.src, ws.out, "--quiet", *flags]}

    def text(data: bytes):
        def mutate(ws: Workspace) -> None:
            ws.text.write_bytes(data)
        return mutate

    def other_vocab_base(ws: Workspace) -> None:
        edit_json(config_set(vocab_size=256), "config.json")(ws.src)
        edit_tensors(lambda t: t.update({name: t[name][:256].clone() for name in
                                         ("model.embed_tokens.weight", "lm_head.weight")}))(ws.src)

    cases = []
    quantize_flags = [
        ("calib-windows-0", ("--calib-windows", "0"), "--calib-windows"),
        ("calib-windows-negative", ("--calib-windows", "-1"), "--calib-windows"),
        ("calib-windows-text", ("--calib-windows", "many"), "--calib-windows"),
        ("calib-seq-len-0", ("--calib-seq-len", "0"), "--calib-seq-len"),
        ("calib-seq-len-1", ("--calib-seq-len", "1"), "--calib-seq-len"),
        ("target-size-1e9999", ("--target-size", "1e9999"), "--target-size"),
        ("target-size-negative", ("--target-size=-5MiB",), "--target-size"),
        ("target-size-nan", ("--target-size", "nan"), "--target-size"),
        ("target-size-words", ("--target-size", "big"), "--target-size"),
        ("target-bpw-nan", ("--target-bpw", "nan"), "--target-bpw"),
        ("target-bpw-inf", ("--target-bpw", "inf"), "--target-bpw"),
        ("target-bpw-0", ("--target-bpw", "0"), "--target-bpw"),
        ("target-bpw-negative", ("--target-bpw", "-4"), "--target-bpw"),
        ("both-targets", ("--target-bpw", "4", "--target-size", "1MiB", "--calib", "self"), "not both"),
        ("max-shard-mb-0", ("--max-shard-mb", "0"), "--max-shard-mb"),
        ("damp-nan", ("--damp", "nan"), "--damp"),
        ("damp-negative", ("--damp", "-0.5"), "--damp"),
        ("tune-steps-negative", ("--tune-steps", "-1"), "--tune-steps"),
        ("e2e-steps-negative", ("--e2e-steps", "-3"), "--e2e-steps"),
        ("e2e-lr-0", ("--e2e-lr", "0"), "--e2e-lr"),
        ("max-ppl-ratio-nan", ("--max-ppl-ratio", "nan"), "--max-ppl-ratio"),
        ("sensitivity-windows-0", ("--sensitivity-windows", "0"), "--sensitivity-windows"),
        ("gptq-without-calib", ("--method", "gptq"), "--calib"),
        ("calib-file-missing", ("--method", "gptq", "--calib", "/nonexistent/calib.txt"), "calib.txt"),
        ("device-tpu", ("--device", "tpu"), "--device"),
        ("candidates-unknown", ("--target-bpw", "4", "--calib", "self", "--candidates", "int4g128,int9"), "int9"),
    ]
    for name, flags, expect in quantize_flags:
        cases.append(Case(f"quantize-{name}", "bad flag", "float", None, commands=("quantize",),
                          argv=quantize(*flags), expect=expect))
    eval_flags = [
        ("ctx-0", ("--ctx", "0"), "--ctx"),
        ("ctx-1", ("--ctx", "1"), "--ctx"),
        ("ctx-beyond-positions", ("--ctx", "4096", "--stride", "64"), "max_position_embeddings 128"),
        ("stride-0", ("--stride", "0"), "--stride"),
        ("stride-beyond-ctx", ("--ctx", "32", "--stride", "64"), "--stride"),
        ("max-windows-0", ("--max-windows", "0"), "--max-windows"),
        ("max-windows-negative", ("--max-windows", "-2"), "--max-windows"),
        ("dtype-int8", ("--dtype", "int8"), "--dtype"),
    ]
    for name, flags, expect in eval_flags:
        cases.append(Case(f"eval-{name}", "bad flag", "nano", None, commands=("eval",), argv=eval_(*flags),
                          expect=expect))
    cases += [
        Case("eval-empty-text", "bad flag", "nano", text(b""), commands=("eval",), argv=eval_(*EVAL_WINDOWS),
             expect="token"),
        Case("eval-one-token-text", "bad flag", "nano", text(b"T"), commands=("eval",), argv=eval_(*EVAL_WINDOWS),
             expect="token"),
        Case("eval-binary-text", "bad flag", "nano", text(b"\xff\xfe\x00\x81" * 64), commands=("eval",),
             argv=eval_(*EVAL_WINDOWS), expect="UTF-8"),
        Case("eval-text-missing", "bad flag", "nano", lambda ws: ws.text.unlink(), commands=("eval",),
             argv=eval_(*EVAL_WINDOWS), expect="not found"),
        Case("eval-base-other-vocab", "bad flag", "nano", other_vocab_base, commands=("eval",),
             argv=eval_(*EVAL_WINDOWS, base=True), expect="vocab_size"),
        Case("eval-base-missing", "bad flag", "nano", None, commands=("eval",),
             argv={"eval": lambda ws: ["eval", ws.nano, "--base", ws.root / "nobase", "--quiet"]}, expect="nobase"),
        Case("eval-base-is-nano", "bad flag", "nano", None, commands=("eval",),
             argv={"eval": lambda ws: ["eval", ws.nano, "--base", ws.nano, "--quiet"]}, expect="already quantized"),
        Case("eval-dir-missing", "bad flag", "nano", None, commands=("eval",),
             argv={"eval": lambda ws: ["eval", ws.root / "nothing", "--quiet"]}, expect="nothing"),
        Case("inspect-a-file", "bad flag", "nano", None, commands=("inspect",),
             argv={"inspect": lambda ws: ["inspect", ws.text]}, expect=""),
        Case("inspect-float-model", "bad flag", "nano", None, commands=("inspect",),
             argv={"inspect": lambda ws: ["inspect", ws.src]}, expect="no quantization_config"),
    ]
    surgery_flags = [
        ("drop-out-of-range", ("--drop", "9"), "9"),
        ("drop-negative", ("--drop", "-1"), ""),
        ("drop-words", ("--drop", "last"), "--drop"),
        ("drop-everything", ("--drop", "0,1"), ""),
        ("swap-itself", ("--swap", "0:0"), "--swap"),
        ("swap-out-of-range", ("--swap", "0:5"), "5"),
        ("duplicate-out-of-range", ("--duplicate", "4"), "4"),
        ("no-operation", (), "--drop"),
        ("search-without-text", ("--search", "drop1"), "--text"),
        ("search-budget-0", ("--search", "drop1", "--budget", "0"), "--budget"),
        ("search-ctx-0", ("--search", "drop1", "--ctx", "0"), "--ctx"),
        ("max-qa-loss-2", ("--search", "drop1", "--max-qa-loss", "2"), "--max-qa-loss"),
    ]
    def search(*flags):
        return {"surgery": lambda ws: ["surgery", ws.src, "--search", "drop1", "--text", ws.text, "--quiet",
                                       "--json", ws.root / "search.json", "--ctx", "16", "--windows", "1",
                                       "--holdout-windows", "0", *flags]}

    def qa_file(data: bytes):
        def mutate(ws: Workspace) -> None:
            (ws.root / "qa.jsonl").write_bytes(data)
        return mutate

    cases += [
        Case("surgery-search-binary-text", "bad flag", "float", text(b"\xff\xfe\x00\x81" * 64), commands=("surgery",),
             argv=search(), expect="UTF-8"),
        Case("surgery-search-short-text", "bad flag", "float", text(b"Hi."), commands=("surgery",), argv=search(),
             expect="tokens"),
        Case("surgery-search-binary-qa", "bad flag", "float", qa_file(b"\xff\x00garbage"), commands=("surgery",),
             argv={"surgery": lambda ws: search("--qa", ws.root / "qa.jsonl")["surgery"](ws)}, expect="UTF-8"),
        Case("surgery-search-qa-not-jsonl", "bad flag", "float", qa_file(b'{"question": 1}\n'), commands=("surgery",),
             argv={"surgery": lambda ws: search("--qa", ws.root / "qa.jsonl")["surgery"](ws)}, expect="qa.jsonl:1"),
    ]
    for name, flags, expect in surgery_flags:
        cases.append(Case(f"surgery-{name}", "bad flag", "float", None, commands=("surgery",), argv=surgery(*flags),
                          expect=expect))
    cases += [
        Case("export-unknown-type", "bad flag", "float", None, commands=("export-gguf",),
             argv={"export-gguf": lambda ws: ["export", "gguf", ws.src, ws.gguf_out, "--type", "q5_k"]},
             expect="--type"),
        Case("export-gguf-not-dot-gguf", "bad flag", "float", None, commands=("export-gguf",),
             argv={"export-gguf": lambda ws: ["export", "gguf", ws.src, ws.out, "--quiet"]}, expect=".gguf"),
        Case("export-gguf-of-nano", "bad flag", "nano", None, commands=("export-gguf",),
             argv={"export-gguf": lambda ws: ["export", "gguf", ws.nano, ws.gguf_out, "--quiet"]},
             expect="quantized"),
        Case("export-ct-of-float", "bad flag", "float", None, commands=("export-ct",),
             argv={"export-ct": lambda ws: ["export", "compressed-tensors", ws.src, ws.out]},
             expect="no quantization_config"),
        Case("export-ct-w8a8-of-int4", "bad flag", "nano", None, commands=("export-ct",),
             argv={"export-ct": lambda ws: ["export", "compressed-tensors", ws.nano, ws.out, "--activations", "int8"]},
             expect="--activations int8"),
        Case("unknown-command", "bad flag", "float", None, commands=("quantize",),
             argv={"quantize": lambda ws: ["quantise", ws.src, ws.out]}, expect="quantise"),
        Case("quantize-no-recipe", "bad flag", "float", None, commands=("quantize",),
             argv={"quantize": lambda ws: ["quantize", ws.src, ws.out]}, expect="--recipe"),
    ]
    return cases


def output_paths() -> list[Case]:
    def existing_nonempty(ws: Workspace) -> None:
        ws.out.mkdir()
        (ws.out / "keep.txt").write_text("mine")
        ws.gguf_out.write_text("mine")

    def existing_file(ws: Workspace) -> None:
        ws.out.write_text("a file")
        ws.gguf_out.write_text("a file")

    def parent_is_file(ws: Workspace) -> None:
        (ws.root / "afile").write_text("x")
        ws.out = ws.root / "afile" / "out"

    def parent_unwritable(ws: Workspace) -> None:
        if os.geteuid() == 0:  # root writes anywhere on an ordinary filesystem: sysfs refuses even root
            ws.out = Path("/sys/nanoq-fuzz-out")
        else:
            locked = ws.root / "locked"
            locked.mkdir(mode=0o500)
            ws.out = locked / "out"

    def out_is_source(ws: Workspace) -> None:
        ws.out = ws.src

    def out_is_nano(ws: Workspace) -> None:
        ws.out = ws.nano

    def json_into(make_path: Callable[[Workspace], Path]):
        def argv(ws: Workspace) -> list:
            return ["eval", ws.nano, "--text", ws.text, *EVAL_WINDOWS, "--quiet", "--json", make_path(ws)]
        return {"eval": argv}

    def unwritable_json(ws: Workspace) -> Path:
        return Path("/sys/nanoq-fuzz.json") if os.geteuid() == 0 else ws.root / "locked" / "x.json"

    def lock_dir(ws: Workspace) -> None:
        (ws.root / "afile").write_text("x")
        if os.geteuid() != 0:
            (ws.root / "locked").mkdir(mode=0o500)

    cases = [
        Case("eval-json-parent-is-a-file", "output path", "nano", lock_dir, commands=("eval",),
             argv=json_into(lambda ws: ws.root / "afile" / "x.json"), expect="afile"),
        Case("eval-json-unwritable", "output path", "nano", lock_dir, commands=("eval",), argv=json_into(unwritable_json)),
    ]
    for name, mutate, expect in [("exists-not-empty", existing_nonempty, "already exists"),
                                 ("is-a-file", existing_file, "already exists"),
                                 ("parent-is-a-file", parent_is_file, "afile"),
                                 ("parent-unwritable", parent_unwritable, "")]:
        cases.append(Case(f"out-{name}", "output path", "float", mutate,
                          commands=("quantize", "surgery", "export-gguf", "export-ct")))
    cases.append(Case("out-is-the-source", "output path", "float", out_is_source, commands=("quantize", "surgery"),
                      expect="already exists"))
    cases.append(Case("out-is-the-checkpoint", "output path", "nano", out_is_nano, commands=("export-ct",),
                      expect="already exists"))
    return cases


def gguf_files() -> list[Case]:
    """`nanoq eval FILE.gguf` of broken GGUF files."""
    def eval_gguf(ws: Workspace) -> list:
        return ["eval", ws.gguf, "--text", ws.text, *EVAL_WINDOWS, "--quiet"]

    def broken(edit: Callable[[bytes], bytes]):
        def mutate(ws: Workspace) -> None:
            ws.gguf.write_bytes(edit(ws.gguf.read_bytes()))
        return mutate

    variants = [
        ("empty", lambda d: b""),
        ("magic-only", lambda d: d[:4]),
        ("cut-in-half", lambda d: d[:len(d) // 2]),
        ("cut-in-the-header", lambda d: d[:200]),
        ("wrong-magic", lambda d: b"FUGG" + d[4:]),
        ("version-99", lambda d: d[:4] + struct.pack("<I", 99) + d[8:]),
        ("tensor-count-huge", lambda d: d[:8] + struct.pack("<Q", 2**40) + d[16:]),
        ("random-bytes", lambda d: random.Random(7).randbytes(len(d))),
    ]
    cases = [Case(f"gguf-{name}", "gguf file", "float", broken(edit), commands=("eval",), argv={"eval": eval_gguf})
             for name, edit in variants]
    cases.append(Case("gguf-missing", "gguf file", "float", lambda ws: ws.gguf.unlink(), commands=("eval",),
                      argv={"eval": eval_gguf}, expect="not found"))
    return cases


def all_cases() -> list[Case]:
    cases = (byte_level() + header_lies() + non_finite() + missing_and_extra() + config_disagreements()
             + manifest_corruption() + index_paths() + bad_recipes() + bad_flags() + output_paths() + gguf_files())
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
