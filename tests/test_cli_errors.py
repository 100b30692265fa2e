"""Bad input: one line on stderr naming the file and the tensor, exit status 2, nothing left behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoq_plugin.cli import main


def run_cli(args, capsys):
    capsys.readouterr()
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.err.strip()


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("nanoq: error: "), err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def assert_nothing_left(tmp_path, out):
    assert not Path(out).exists()
    assert not list(Path(tmp_path).glob(".*nanoq-tmp*"))


@pytest.fixture
def source(tiny_llama, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(tiny_llama, copy)
    return copy


@pytest.fixture
def nano(tiny_llama, tmp_path, capsys):
    out = tmp_path / "nano"
    assert main(["quantize", str(tiny_llama), str(out), "--recipe", "w4g128", "--quiet"]) == 0
    return out


def test_truncated_safetensors(source, tmp_path, capsys):
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", "w8"], capsys)
    assert_one_line_error(status, err, weights, "corrupt or truncated")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_corrupt_safetensors_header(source, tmp_path, capsys):
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00garbage"
    weights.write_bytes(bytes(data))
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", "w8"], capsys)
    assert_one_line_error(status, err, weights, "corrupt or truncated")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_source_tensor_missing(source, tmp_path, capsys):
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(source / "model.safetensors"))
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", "w4g128"], capsys)
    assert_one_line_error(status, err, source, "'model.layers.1.mlp.up_proj.weight' is missing")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_unsupported_model_type(source, tmp_path, capsys):
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "gpt2"
    (source / "config.json").write_text(json.dumps(config))
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", "w8"], capsys)
    assert_one_line_error(status, err, source / "config.json", "the decoder blocks of GPT2LMHeadModel hold no nn.Linear")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_unknown_scheme_in_recipe(source, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("default: int4g64\nrules:\n  - 'down_proj': int6g64\n")
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", recipe], capsys)
    assert_one_line_error(status, err, recipe, "rule 1", "unknown scheme 'int6g64'")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_group_size_does_not_divide(source, tmp_path, capsys):
    recipe = tmp_path / "pinned.yaml"
    recipe.write_text("default: int4g64\n")  # hidden size 96
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", recipe], capsys)
    assert_one_line_error(status, err, "model.layers.0.self_attn.q_proj.weight",
                          "group size 64 does not divide input dim 96 (choose group size 32)")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_existing_output_is_not_touched(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = run_cli(["quantize", source, out, "--recipe", "w8"], capsys)
    assert_one_line_error(status, err, out, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_nano_tensor_missing(nano, capsys):
    tensors = load_file(str(nano / "model.safetensors"))
    del tensors["model.layers.0.mlp.gate_proj.qweight"]
    save_file(tensors, str(nano / "model.safetensors"))
    status, err = run_cli(["inspect", nano], capsys)
    assert_one_line_error(status, err, nano, "'model.layers.0.mlp.gate_proj.qweight' is missing")


def test_nano_tensor_wrong_shape(nano, capsys):
    tensors = load_file(str(nano / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.scales"] = torch.ones(2, 96, dtype=torch.float16)
    save_file(tensors, str(nano / "model.safetensors"))
    status, err = run_cli(["inspect", nano], capsys)
    assert_one_line_error(status, err, nano / "model.safetensors", "'model.layers.1.self_attn.o_proj.scales'",
                          "float16 [2, 96]", "float16 [3, 96]")


def test_manifest_disagrees_with_tensors(nano, capsys):
    manifest = json.loads((nano / "nano_manifest.json").read_text())
    manifest["modules"]["model.layers.0.mlp.down_proj"]["tensors"]["qweight"]["shape"] = [64, 96]
    (nano / "nano_manifest.json").write_text(json.dumps(manifest))
    status, err = run_cli(["inspect", nano], capsys)
    assert_one_line_error(status, err, nano / "nano_manifest.json", "'model.layers.0.mlp.down_proj.qweight'")


def test_manifest_scheme_disagrees_with_config(nano, capsys):
    manifest = json.loads((nano / "nano_manifest.json").read_text())
    manifest["modules"]["model.layers.1.mlp.up_proj"]["scheme"] = "int8"
    (nano / "nano_manifest.json").write_text(json.dumps(manifest))
    status, err = run_cli(["eval", nano], capsys)
    assert_one_line_error(status, err, nano / "nano_manifest.json", "'model.layers.1.mlp.up_proj'", "int4g32")


def test_float_checkpoint_is_not_nano(tiny_llama, capsys):
    status, err = run_cli(["inspect", tiny_llama], capsys)
    assert_one_line_error(status, err, tiny_llama / "config.json", "no quantization_config")


def test_console_script_exit_status_and_no_traceback(source, tmp_path):
    (source / "model.safetensors").write_bytes(b"\x01\x02")
    done = subprocess.run([sys.executable, "-m", "nanoq_plugin.cli", "quantize", str(source), str(tmp_path / "out"),
                           "--recipe", "w8"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"nanoq: error: {source / 'model.safetensors'}: truncated safetensors file (2 bytes)"]
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_transformers_refuses_a_checkpoint_with_a_missing_tensor(nano):
    from transformers import AutoModelForCausalLM

    from nanoq_plugin.errors import NanoqError

    tensors = load_file(str(nano / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, str(nano / "model.safetensors"))
    with pytest.raises(NanoqError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.scales' is missing"):
        AutoModelForCausalLM.from_pretrained(nano)


def test_eval_without_tokenizer_says_so(nano, capsys):
    status, err = run_cli(["eval", nano], capsys)
    assert_one_line_error(status, err, nano, "no tokenizer files")


def test_already_quantized_source(nano, tmp_path, capsys):
    status, err = run_cli(["quantize", nano, tmp_path / "again", "--recipe", "w8"], capsys)
    assert_one_line_error(status, err, nano / "config.json", "already quantized (quant_method 'nano')")
    assert_nothing_left(tmp_path, tmp_path / "again")


def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys):
    import nanoq_plugin.cli as cli

    def full(args):
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    monkeypatch.setattr(cli, "cmd_inspect", full)
    status, err = run_cli(["inspect", "x"], capsys)
    assert_one_line_error(status, err, "/data/out/model.safetensors: No space left on device")


def test_an_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    import signal

    import nanoq_plugin.cli as cli

    def broken(args):
        raise RuntimeError("boom\nmore detail")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    monkeypatch.delenv("NANOQ_DEBUG", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    status, err = run_cli(["inspect", "x"], capsys)
    assert status == 1
    assert err == "nanoq: internal error: RuntimeError: boom (run with NANOQ_DEBUG=1 for the traceback)"
    assert signal.getsignal(signal.SIGTERM) is before  # main restores the handlers it installed
    monkeypatch.setenv("NANOQ_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", "x"])


def test_bad_argument_values_are_refused_where_they_are_parsed(capsys):
    for args, fragment in [(["eval", "d", "--ctx", "0"], "argument --ctx: expected an integer >= 2"),
                           (["eval", "d", "--max-windows", "0"], "argument --max-windows: expected a positive integer"),
                           (["quantize", "s", "o", "--recipe", "w8", "--target-bpw", "nan"],
                            "argument --target-bpw: expected a positive finite number, got 'nan'"),
                           (["quantize", "s", "o", "--recipe", "w8", "--target-size", "1e9999"],
                            "--target-size '1e9999': expected a positive, finite size"),
                           (["quantize", "s", "o"], "the following arguments are required: --recipe")]:
        status, err = run_cli(args, capsys)
        assert_one_line_error(status, err, fragment)


def test_nan_source_is_refused_naming_the_tensor_and_index(source, tmp_path, capsys):
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"][5, 7] = float("nan")
    save_file(tensors, str(source / "model.safetensors"))
    status, err = run_cli(["quantize", source, tmp_path / "out", "--recipe", "w4g128", "--quiet"], capsys)
    assert_one_line_error(status, err, source / "model.safetensors",
                          "tensor 'model.layers.0.self_attn.k_proj.weight' has a non-finite value (nan) at index [5, 7]")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_config_with_more_layers_than_stored_is_refused_everywhere(nano, tmp_path, capsys):
    config = json.loads((nano / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (nano / "config.json").write_text(json.dumps(config))
    for args in (["inspect", nano], ["eval", nano], ["export", "compressed-tensors", nano, tmp_path / "ct"]):
        status, err = run_cli(args, capsys)
        assert_one_line_error(status, err, "'model.layers.2.", "is missing")
    assert_nothing_left(tmp_path, tmp_path / "ct")
