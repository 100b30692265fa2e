"""`nanoq export gguf`: the file reloads in transformers with the source's logits (up to the chosen type's
rounding), llama's q/k rows are in llama.cpp's order, the tokenizer and chat template round-trip, and
`nanoq eval` scores the file.

Tolerances. The exact check is against the source model with every exported matrix rounded the way the
file stores it (gguf-py's quantize then dequantize, or a float16 cast): that model and the reloaded file
must agree to float32 noise (measured: bit-identical), which pins names, the q/k permutation, the config
and the per-tensor types. Against the unrounded source the logits differ by what the rounding costs:
float16 holds bf16 values exactly (except subnormals below 6.1e-5); Q8_0 rounds each weight to 1/127 of
its block's absmax (~0.5% RMS), Q4_0 to 1/8 of it (~8% RMS), and on these random, untrained blocks the
error grows through attention and the gated MLP, and with depth. Measured worst cases over the 2-block models
(llama, mistral, qwen2, qwen3, gemma2, phi3): f16 0 (the bf16 weights are exact in f16 here); q8_0 max |error|
1.7% of the largest logit, cosine >= 0.9998; q4_0 30% and 0.952. Gemma 3's 6 blocks: q8_0 3.3% and 0.9991,
q4_0 37% and 0.844. The bounds leave about twice the worst errors.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.export.gguf import export_gguf
from nanoq_plugin.export.gguf_arch import ARCHITECTURES
from nanoq_plugin.export.gguf_vocab import PRE_TOKENIZERS, llama_cpp_pre_tokenizer

from gguf_models import EXTRA, SAMPLE, tiny_model

GGML = gguf.GGMLQuantizationType
# type -> (max |logit error| / max |logit| against the unrounded source, minimum cosine of the logits)
TOLERANCE = {"f16": (1e-3, 0.99999), "q8_0": (0.07, 0.998), "q4_0": (0.75, 0.70)}


CASES = [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True), ("mistral", False), ("gemma2", True),
         ("gemma3_text", True), ("phi3", False)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def source(request, tmp_path_factory, small_tokenizer):
    arch, tied = request.param
    return tiny_model(arch, tmp_path_factory.mktemp("gguf") / f"{arch}-{tied}", small_tokenizer, tied)


def rounded_like_the_file(model, tensor_type: str, tied: bool):
    """The source with every matrix rounded as the export stores it (the test's own statement of the table
    in nanoq_plugin/export/gguf.py)."""
    qtype = {"f16": GGML.F16, "q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}[tensor_type]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            wanted = GGML.Q8_0 if tensor_type == "q4_0" and (name == "lm_head.weight" or
                                                            (tied and name == "model.embed_tokens.weight")) else qtype
            data = param.data.float().numpy()
            if wanted == GGML.F16:
                data = data.astype(np.float16).astype(np.float32)
            else:
                data = gguf.quants.dequantize(gguf.quants.quantize(data, wanted), wanted)
            param.data.copy_(torch.from_numpy(data))
    return model


def load(directory, **kwargs):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("tensor_type", ["f16", "q8_0", "q4_0"])
def test_reloads_in_transformers_with_the_logits_of_its_type(source, tmp_path, tensor_type):
    result = export_gguf(source, tmp_path / "model.gguf", tensor_type, progress=False)
    assert not list(tmp_path.glob(".*nanoq-tmp*"))
    config = json.loads((source / "config.json").read_text())
    tied = config["tie_word_embeddings"]

    reader = gguf.GGUFReader(str(result.path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert ("output.weight" in types) is not tied
    main_type = {"f16": GGML.F16, "q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}[tensor_type]
    head = "token_embd.weight" if tied else "output.weight"
    assert types[head] == (GGML.Q8_0 if tensor_type == "q4_0" else main_type)
    shapes = {t.name: len(t.shape) for t in reader.tensors}
    matrices = [name for name in types if shapes[name] == 2 and name != head]
    assert {types[name] for name in matrices} == {main_type}
    assert result.tensor_types[main_type.name] == len(matrices) + (types[head] == main_type)
    assert {types[name] for name in types if shapes[name] == 1} == {GGML.F32}
    layers = config["num_hidden_layers"]
    assert len(matrices) == layers * (4 if config["model_type"] == "phi3" else 7) + (0 if tied else 1)

    reloaded = load(tmp_path, gguf_file="model.gguf")
    assert reloaded.config.num_hidden_layers == layers and reloaded.config.tie_word_embeddings == tied
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = reloaded(ids).logits
        exact = rounded_like_the_file(load(source), tensor_type, tied)(ids).logits
        original = load(source)(ids).logits
    scale = original.abs().max()
    assert (got - exact).abs().max() <= 1e-4 * scale  # same numbers up to float32 summation order
    max_error, min_cosine = TOLERANCE[tensor_type]
    assert (got - original).abs().max() <= max_error * scale
    cosine = torch.nn.functional.cosine_similarity(got.flatten(0, 1), original.flatten(0, 1), dim=-1)
    assert cosine.min() >= min_cosine


def test_llama_q_and_k_rows_are_in_llama_cpp_order(tmp_path, small_tokenizer):
    source = tiny_model("llama", tmp_path / "src", small_tokenizer, tied=True)
    export_gguf(source, tmp_path / "f16.gguf", "f16", progress=False)
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(tmp_path / "f16.gguf")).tensors}
    hf = load(source).state_dict()
    for gguf_name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        stored, original = tensors[f"blk.0.{gguf_name}.weight"], hf[f"model.layers.0.self_attn.{hf_name}.weight"].numpy()
        head_dim = original.shape[0] // heads
        for h in range(heads):
            for i in range(head_dim // 2):  # llama.cpp rotates pairs (2i, 2i+1); HF rotates (i, i + d/2)
                assert np.array_equal(stored[h * head_dim + 2 * i], original[h * head_dim + i].astype(np.float16))
                assert np.array_equal(stored[h * head_dim + 2 * i + 1],
                                      original[h * head_dim + i + head_dim // 2].astype(np.float16))
    assert np.array_equal(tensors["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"].numpy().astype(np.float16))


def test_qwen_rows_are_not_permuted_and_biases_and_norms_are_kept(tmp_path, small_tokenizer):
    for arch, extra in (("qwen2", "attn_q.bias"), ("qwen3", "attn_q_norm.weight")):
        source = tiny_model(arch, tmp_path / arch, small_tokenizer, tied=False)
        export_gguf(source, tmp_path / f"{arch}.gguf", "f16", progress=False)
        tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / f"{arch}.gguf")).tensors}
        hf = load(source).state_dict()
        assert np.array_equal(tensors["blk.1.attn_q.weight"],
                              hf["model.layers.1.self_attn.q_proj.weight"].numpy().astype(np.float16))
        hf_extra = "model.layers.1.self_attn." + ("q_proj.bias" if arch == "qwen2" else "q_norm.weight")
        assert tensors[f"blk.1.{extra}"].dtype == np.float32
        assert np.array_equal(tensors[f"blk.1.{extra}"], hf[hf_extra].numpy())


# What each new family's llama.cpp converter writes beyond the shared keys (convert_hf_to_gguf.py's Gemma2Model,
# Gemma3Model, Phi3MiniModel; Mistral goes through LlamaModel). transformers' reader ignores some of these
# (Gemma 2's soft-capping, Phi-3's window), so the reload cannot check them: this does. (Gemma 2's
# rope.freq_base is the one key added: llama.cpp's converter leaves it to its loader's default, 10000.)
FAMILY_KEYS = {
    "mistral": ("llama", {"llama.rope.dimension_count": 32, "llama.vocab_size": 320, "llama.rope.freq_base": 10000.0}),
    "gemma2": ("gemma2", {"gemma2.attention.key_length": 256, "gemma2.attention.value_length": 256,
                          "gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                          "gemma2.attention.sliding_window": 8, "gemma2.rope.freq_base": 20000.0}),
    "gemma3_text": ("gemma3", {"gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
                               "gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 500000.0,
                               "gemma3.block_count": 6}),
    "phi3": ("phi3", {"phi3.rope.dimension_count": 32, "phi3.rope.scaling.original_context_length": 4096,
                      "phi3.attention.sliding_window": 0, "phi3.rope.freq_base": 10000.0}),
    "phi3-window": ("phi3", {"phi3.attention.sliding_window": 127}),  # Phi-3-mini's window (2047 there)
}


@pytest.mark.parametrize("case", list(FAMILY_KEYS))
def test_family_hyperparameters_are_llama_cpps(tmp_path, small_tokenizer, case):
    model_type = case.removesuffix("-window")
    extra = {"sliding_window": 127} if case.endswith("-window") else {}
    source = tiny_model(model_type, tmp_path / "src", small_tokenizer, tied=model_type.startswith("gemma"), **extra)
    export_gguf(source, tmp_path / "m.gguf", "f16", progress=False)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    arch, expected = FAMILY_KEYS[case]
    assert fields["general.architecture"].contents() == arch
    assert {key: fields[key].contents() for key in expected} == pytest.approx(expected)
    absent = {"gemma2": ["gemma2.vocab_size", "gemma2.rope.dimension_count"],
              "gemma3_text": ["gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping"]}
    assert not [key for key in absent.get(model_type, []) if key in fields]


def test_gemma_norms_are_stored_as_one_plus_w(tmp_path, small_tokenizer):
    """Gemma computes x * (1 + w), llama.cpp x * w: every norm (Gemma 3's q/k norms too) is stored as 1 + w, in
    F32, the matrices unchanged and unpermuted (NeoX rotary)."""
    for model_type, gguf_norms in (("gemma2", ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")),
                                   ("gemma3_text", ("attn_norm", "attn_q_norm", "attn_k_norm", "post_ffw_norm"))):
        source = tiny_model(model_type, tmp_path / model_type, small_tokenizer, tied=True)
        export_gguf(source, tmp_path / f"{model_type}.gguf", "f16", progress=False)
        tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / f"{model_type}.gguf")).tensors}
        hf = {name: value.float().numpy() for name, value in load(source).state_dict().items()}
        hf_names = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
        for name in gguf_norms:
            stored, original = tensors[f"blk.1.{name}.weight"], hf[f"model.layers.1.{hf_names[name]}.weight"]
            assert stored.dtype == np.float32 and np.array_equal(stored, original + 1), (model_type, name)
        assert np.array_equal(tensors["output_norm.weight"], hf["model.norm.weight"] + 1)
        assert np.array_equal(tensors["blk.0.attn_q.weight"],
                              hf["model.layers.0.self_attn.q_proj.weight"].astype(np.float16))


def test_phi3_keeps_qkv_and_gate_up_fused(tmp_path, small_tokenizer):
    """llama.cpp's phi3 reads the fused projections: attn_qkv is q, k, v stacked (128 + 2 x 64 rows here) and
    ffn_up is gate then up (2 x 256 rows), both as Hugging Face stores them."""
    source = tiny_model("phi3", tmp_path / "src", small_tokenizer, tied=False)
    export_gguf(source, tmp_path / "m.gguf", "f16", progress=False)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert not [name for name in tensors if ".attn_q." in name or ".ffn_gate." in name]
    hf = load(source).state_dict()
    for gguf_name, hf_name, rows in (("attn_qkv", "self_attn.qkv_proj", 256), ("ffn_up", "mlp.gate_up_proj", 512)):
        stored = tensors[f"blk.0.{gguf_name}.weight"]
        assert stored.shape == (rows, 128)
        assert np.array_equal(stored, hf[f"model.layers.0.{hf_name}.weight"].numpy().astype(np.float16))


def test_tokenizer_and_chat_template_round_trip(tmp_path, smollm2_dir):
    source = tiny_model("llama", tmp_path / "src", smollm2_dir, tied=True, vocab_size=49152)
    export_gguf(source, tmp_path / "m.gguf", "q8_0", progress=False)
    original = AutoTokenizer.from_pretrained(source)
    restored = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = SAMPLE + " " + (smollm2_dir / "chat_template.jinja").read_text()[:300]
    assert restored(text).input_ids == original(text).input_ids
    messages = [{"role": "user", "content": "Name a color, 3 times."}]
    assert restored.chat_template == original.chat_template
    assert restored.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert value("tokenizer.ggml.add_bos_token") is False
    assert len(value("tokenizer.ggml.tokens")) == 49152 and value("tokenizer.ggml.token_type")[:3] == [3, 3, 3]
    assert value("llama.rope.dimension_count") == 32 and value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_pre_tokenizer_names_match_the_splits_transformers_reads():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZERS["qwen2"][0][1] == GGUF_PRE_TOKENIZER_SPLITS["qwen2"]
    assert PRE_TOKENIZERS["llama-bpe"][0][1] == GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]
    qwen2 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["qwen2"]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}
    assert llama_cpp_pre_tokenizer(qwen2, "t.json") == "qwen2"
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}}
    assert llama_cpp_pre_tokenizer(smollm, "t.json") == "smollm"
    with pytest.raises(NanoqError, match=r"t.json: pre_tokenizer \['Metaspace'\] matches none llama.cpp names here"):
        llama_cpp_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}, "t.json")


def run_cli(args, capsys):
    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip()


def test_bad_input_is_one_line(tmp_path, tiny_llama, capsys):
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    status, err = run_cli(["export", "gguf", tiny_llama, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert ("config.json: model_type 'gpt2' has no GGUF export (supported: llama, mistral, qwen2, qwen3, gemma2, "
            "gemma3_text, phi3, olmo2, granite)") in err
    (tiny_llama / "config.json").write_text(json.dumps(config))
    status, err = run_cli(["export", "gguf", tiny_llama, tmp_path / "x.gguf"], capsys)
    assert status == 2 and "no tokenizer.json" in err
    nano = tmp_path / "nano"
    assert main(["quantize", str(tiny_llama), str(nano), "--recipe", "w8", "--quiet"]) == 0
    status, err = run_cli(["export", "gguf", nano, tmp_path / "x.gguf", "--type", "q4_0"], capsys)
    assert status == 2 and "quantized (quant_method 'nano'); export the float model" in err
    (tmp_path / "taken.gguf").write_text("user data")
    status, err = run_cli(["export", "gguf", tiny_llama, tmp_path / "taken.gguf"], capsys)
    assert status == 2 and "taken.gguf: already exists" in err and (tmp_path / "taken.gguf").read_text() == "user data"
    status, err = run_cli(["export", "compressed-tensors", nano, tmp_path / "ct", "--type", "q8_0"], capsys)
    assert status == 2 and "--type goes with `nanoq export gguf`" in err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*nanoq-tmp*"))


REFUSED = [
    ("gemma", {}, "model_type 'gemma' has no GGUF export (supported: llama, mistral, qwen2, qwen3, gemma2, "
                  "gemma3_text, phi3, olmo2, granite)"),
    ("granite", {"head_dim": 32}, "head_dim 32 differs from hidden_size / num_attention_heads 24; llama.cpp's granite "
                                  "has no head_dim"),
    ("olmo2", {"attention_bias": True}, "olmo2 with attention_bias is not exported"),
    ("gemma3", {}, "model_type 'gemma3' is the multimodal Gemma 3; export its text model (model_type gemma3_text)"),
    ("mistral", {"sliding_window": 64}, "sliding_window 64 is shorter than max_position_embeddings 256; llama's "
                                        "GGUF has no sliding window"),
    ("gemma2", {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar 144 differs from head_dim 256; llama.cpp "
                                               "scales Gemma's attention by 1/sqrt(head_dim)"),
    ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping is not set; llama.cpp's gemma2 always"),
    ("gemma2", {"tie_word_embeddings": False}, "untied Gemma 2 head"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types is not llama.cpp's fixed pattern for gemma2 (a global layer every 2"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}},
     "sliding-window layers' rope_theta 20000.0; llama.cpp's gemma3 fixes it at 10000"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
     "rope_type 'linear' (full_attention layers) is not exported"),
    ("gemma3_text", {"hidden_activation": "gelu"},
     "hidden_activation 'gelu'; llama.cpp's Gemma uses gelu_pytorch_tanh"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor 0.75: transformers cannot load a partial-rotary phi3 GGUF to check it"),
]


@pytest.mark.parametrize("model_type, change, message", REFUSED,
                         ids=[f"{t}-{'-'.join(c) or 'type'}" for t, c, _ in REFUSED])
def test_what_the_file_cannot_hold_is_refused_in_one_line(tmp_path, tiny_llama, capsys, model_type, change, message):
    """A family gguf-py names but transformers cannot read back, and a config whose values llama.cpp's graph for
    its family would not compute, are refused before anything is written."""
    config = json.loads((tiny_llama / "config.json").read_text())
    if model_type in {"mistral", "gemma2", "gemma3_text", "phi3"}:
        from transformers import AutoConfig

        shape = {"num_hidden_layers": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}
        config = AutoConfig.for_model(model_type, **{**shape, **EXTRA[model_type]}).to_dict()
    (tiny_llama / "config.json").write_text(json.dumps({**config, "model_type": model_type, **change}))
    status, err = run_cli(["export", "gguf", tiny_llama, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*nanoq-tmp*"))


def test_a_sentencepiece_style_tokenizer_without_its_model_is_refused_in_one_line(tmp_path, small_tokenizer, capsys):
    source = tiny_model("gemma2", tmp_path / "src", small_tokenizer, tied=True)
    data = json.loads((source / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (source / "tokenizer.json").write_text(json.dumps(data))
    status, err = run_cli(["export", "gguf", source, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert "tokenizer.json: a SentencePiece-style tokenizer (BPE with byte_fallback" in err and "no tokenizer.model" in err
    assert not (tmp_path / "x.gguf").exists()


SENTENCEPIECE_CASES = [("llama", False), ("mistral", True), ("phi3", False), ("gemma2", True), ("gemma3_text", True)]


@pytest.mark.parametrize("model_type, tied", SENTENCEPIECE_CASES, ids=[m for m, _ in SENTENCEPIECE_CASES])
def test_a_sentencepiece_tokenizer_reloads_with_the_same_ids(tmp_path, sentencepiece_tokenizer,
                                                             gemma_sentencepiece_tokenizer, model_type, tied):
    """The folder's tokenizer.model is written as llama.cpp's "llama" tokenizer (scores, byte pieces, Gemma's
    missing word marker as add_space_prefix false): transformers' tokenizer of the file gives the source
    tokenizer's ids, chat template and special tokens included. transformers' GGUF reader ignores
    add_bos_token, so the ids are compared without the added BOS and the flag against the source's."""
    tokenizer = gemma_sentencepiece_tokenizer if model_type.startswith("gemma") else sentencepiece_tokenizer
    source = tiny_model(model_type, tmp_path / "src", tokenizer, tied=tied, vocab_size=400)
    export_gguf(source, tmp_path / "m.gguf", "f16", progress=False)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert ("tokenizer.ggml.add_space_prefix" in fields) is model_type.startswith("gemma")
    original, reloaded = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    prompt = original.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                          add_generation_prompt=True)
    texts = ["Hello  world", "Über café naïve, 12345"]
    # transformers' phi3 GGUF tokenizer prepends a word marker to every piece of text between special tokens
    # (its Prepend normalizer), the source tokenizer only to the first: compared on plain text only
    texts += [] if model_type == "phi3" else [SAMPLE, prompt]
    for text in texts:
        assert reloaded(text, add_special_tokens=False).input_ids == original(text, add_special_tokens=False).input_ids
    assert fields["tokenizer.ggml.add_bos_token"].contents() is (original("x").input_ids[0] == original.bos_token_id)
    assert original("x").input_ids[0] == original.bos_token_id  # the fixtures add BOS: the flag's true case shows
    assert reloaded.chat_template == original.chat_template


def test_a_broken_sentencepiece_model_is_refused_in_one_line(tmp_path, sentencepiece_tokenizer, capsys):
    source = tiny_model("llama", tmp_path / "src", sentencepiece_tokenizer, tied=False, vocab_size=400)
    (source / "tokenizer.model").write_bytes(b"not a protobuf")
    status, err = run_cli(["export", "gguf", source, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "tokenizer.model: not a readable SentencePiece model" in err
    small = tiny_model("llama", tmp_path / "small", sentencepiece_tokenizer, tied=False, vocab_size=320)
    status, err = run_cli(["export", "gguf", small, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert "tokenizer.model: 400 pieces do not fit the model's vocab_size 320" in err
    malformed = tiny_model("llama", tmp_path / "malformed", sentencepiece_tokenizer, tied=False, vocab_size=400)
    config = json.loads((malformed / "tokenizer_config.json").read_text())
    (malformed / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": {"3": {"x": 1}}}))
    status, err = run_cli(["export", "gguf", malformed, tmp_path / "x.gguf"], capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert "tokenizer_config.json: an added token entry is malformed (KeyError" in err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*nanoq-tmp*"))


def test_the_docs_list_the_exported_families():
    """docs/gguf.md names the model types `ARCHITECTURES` exports, in its order."""
    import re
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "gguf.md").read_text()
    line = next(line for line in page.splitlines() if line.startswith("Exported model types"))
    assert re.findall(r"`([a-z0-9_]+)`", line) == list(ARCHITECTURES)


def test_cli_export_then_eval_reports_perplexity(tmp_path, small_tokenizer, capsys):
    source = tiny_model("qwen2", tmp_path / "src", small_tokenizer, tied=False)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river {i} runs to the sea, and the sea is wide." for i in range(60)))
    ratios = {}
    for tensor_type in ("f16", "q4_0"):
        out = tmp_path / f"m-{tensor_type}.gguf"
        assert main(["export", "gguf", str(source), str(out), "--type", tensor_type, "--quiet"]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert main(["eval", str(out), "--base", str(source), "--text", str(text), "--ctx", "64", "--stride", "64",
                     "--quiet"]) == 0
        printed = capsys.readouterr().out
        assert "perplexity" in printed and f"wrote {tmp_path / f'm-{tensor_type}.eval_summary.json'}" in printed
        summary = json.loads((tmp_path / f"m-{tensor_type}.eval_summary.json").read_text())
        ratios[tensor_type] = summary["ppl_ratio"]
        # q4_0: the untied output matrix is Q8_0 (8.5 bits), every other matrix Q4_0 (4.5 bits)
        head, blocks = 320 * 128, 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)
        expected = {"f16": 16.0, "q4_0": (8.5 * head + 4.5 * (head + blocks)) / (2 * head + blocks)}[tensor_type]
        assert summary["storage"]["quantized_bits_per_weight"] == pytest.approx(expected, abs=1e-3)
    assert abs(ratios["f16"] - 1) < 1e-3 and abs(ratios["q4_0"] - 1) > abs(ratios["f16"] - 1)


@pytest.mark.slow
def test_smollm2_q4_0_with_its_real_tokenizer(smollm2_dir, tmp_path):
    result = export_gguf(smollm2_dir, tmp_path / "smollm2-q4_0.gguf", "q4_0", progress=False)
    assert result.tensor_types == {"F32": 61, "Q4_0": 210, "Q8_0": 1}  # 30 x 7 matrices, the tied table Q8_0
    reloaded = load(tmp_path, gguf_file=result.path.name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=result.path.name)
    original_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = original_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                    tokenize=False, add_generation_prompt=True)
    assert tokenizer(prompt + SAMPLE).input_ids == original_tokenizer(prompt + SAMPLE).input_ids
    ids = original_tokenizer(prompt + "The capital of France is Paris, a city on the Seine.", return_tensors="pt").input_ids
    with torch.no_grad():
        got = reloaded(ids).logits[0]
        exact = rounded_like_the_file(load(smollm2_dir), "q4_0", tied=True)(ids).logits[0]
        original = load(smollm2_dir)(ids).logits[0]
    assert (got - exact).abs().max() <= 1e-4 * original.abs().max()
    # q4_0 costs this model real accuracy (benchmark, 8192 positions: mean cosine 0.867, top-1 0.693)
    assert torch.nn.functional.cosine_similarity(got, original, dim=-1).mean() >= 0.75
    assert (got.argmax(-1) == original.argmax(-1)).float().mean() >= 0.5


@pytest.mark.slow
def test_gemma3_keys_and_norms_are_those_of_llama_cpps_own_file(gemma3_dir, tmp_path):
    """Gemma 3 270M's folder was made from llama.cpp's own GGUF of it (the example model's package): the export
    writes the same `gemma3.*` keys with the same values, the same tensor names, and the norms back as the
    file's `1 + w` (up to the folder's bf16 rounding of w). The tokenizer is not compared: the folder, made from
    the GGUF, has no tokenizer.model, so the export refuses its SentencePiece-style tokenizer.json."""
    from nanoq_plugin.example_model import EXAMPLE_MODELS
    from nanoq_plugin.export.gguf import _plan, _tensor_data
    from nanoq_plugin.format.checkpoint import SourceCheckpoint

    reference = gguf.GGUFReader(str(EXAMPLE_MODELS["gemma3-270m"].locate_gguf(tmp_path)))
    source = SourceCheckpoint(gemma3_dir)
    family = ARCHITECTURES["gemma3_text"]
    writer = gguf.GGUFWriter(path=None, arch="gemma3")
    family.hyperparameters(writer, source.config)
    ours = {key: value.value for key, value in writer.kv_data[0].items() if key.startswith("gemma3.")}
    theirs = {key: field.contents() for key, field in reference.fields.items() if key.startswith("gemma3.")}
    assert ours == theirs
    planned = {item.name: item for item in _plan(source, family, "f16")}
    stored = {t.name: t for t in reference.tensors}
    assert set(planned) == set(stored)
    norms = [name for name in stored if name.endswith("norm.weight")]
    assert len(norms) == 18 * 6 + 1
    for name in norms:
        expected = np.array(stored[name].data, dtype=np.float32)
        got = _tensor_data(source, planned[name], source.config, family)
        # the folder holds w = file - 1 rounded to bf16 (8 significant bits); without the + 1 this is off by 1
        assert (np.abs(got - expected) <= np.abs(expected - 1) / 256 + 1e-6).all(), name
