"""`nanoq export gguf`: the file reloads in transformers with the source's logits (up to the chosen type's
rounding), llama's q/k rows are in llama.cpp's order, the tokenizer and chat template round-trip, and
`nanoq eval` scores the file.

Tolerances. The exact check is against the source model with every exported matrix rounded the way the
file stores it (gguf-py's quantize then dequantize, or a float16 cast): that model and the reloaded file
must agree to float32 noise (measured: bit-identical), which pins names, the q/k permutation, the config
and the per-tensor types. Against the unrounded source the logits differ by what the rounding costs:
float16 holds bf16 values exactly (except subnormals below 6.1e-5); Q8_0 rounds each weight to 1/127 of
its block's absmax (~0.5% RMS), Q4_0 to 1/8 of it (~8% RMS), and on these random, untrained blocks the
error grows through attention and the gated MLP. Measured worst cases over llama/qwen2/qwen3: f16 0 (the
bf16 weights are exact in f16 here); q8_0 max |error| 1.7% of the largest logit, cosine >= 0.9997; q4_0 24%
and 0.952. The bounds leave about twice those errors.
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
from nanoq_plugin.export.gguf_vocab import PRE_TOKENIZERS, llama_cpp_pre_tokenizer

from gguf_models import SAMPLE, tiny_model

GGML = gguf.GGMLQuantizationType
# type -> (max |logit error| / max |logit| against the unrounded source, minimum cosine of the logits)
TOLERANCE = {"f16": (1e-3, 0.99999), "q8_0": (0.04, 0.999), "q4_0": (0.5, 0.90)}


CASES = [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)]


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
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == main_type
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGML.F32
    head = "token_embd.weight" if tied else "output.weight"
    assert types[head] == (GGML.Q8_0 if tensor_type == "q4_0" else main_type)
    assert result.tensor_types[main_type.name] >= 14

    reloaded = load(tmp_path, gguf_file="model.gguf")
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.tie_word_embeddings == tied
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
    assert "config.json: model_type 'gpt2' has no GGUF export (supported: llama, qwen2, qwen3)" in err
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
