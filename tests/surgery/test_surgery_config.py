"""The surgered config: per-layer lists found in transformers' config classes (stated or derived) follow their
blocks, patterns are restated or refused, block-index lists are renumbered, and a field that sets blocks by index
in a way surgery cannot rewrite is refused by building the blocks."""

import json

import pytest
from transformers import AutoConfig

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.surgery.config import surgered_config
from nanoq_plugin.surgery.layer_fields import layer_fields
from nanoq_plugin.surgery.plan import build_layer_map

S, F = "sliding_attention", "full_attention"


def config_of(model_type, num_layers=4, unstated=(), **fields):
    """A config.json dict of a tiny `model_type` as transformers writes it, without the keys in `unstated` (as a
    config.json that does not state them)."""
    config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, intermediate_size=64, pad_token_id=0,
                                  **fields).to_dict()
    return {k: v for k, v in config.items() if k not in unstated}


def test_stated_layer_types_follow_their_blocks():
    config = config_of("gemma3_text", sliding_window=16, layer_types=[S, F, S, S])
    new = surgered_config(config, build_layer_map(4, drop=[0], swap=[(2, 3)], duplicate=[1]), "config.json")
    assert new["num_hidden_layers"] == 4 and new["layer_types"] == [F, F, S, S]
    assert config["layer_types"] == [S, F, S, S]  # the input is not modified
    # dropping a sliding block keeps every other block's type (a truncated list would make block 2 sliding)
    assert surgered_config(config, build_layer_map(4, drop=[2]), "c")["layer_types"] == [S, F, S]


def test_a_derived_per_layer_list_is_written_out():
    """Gemma 2 alternates sliding and full attention by index when config.json states no layer_types: dropping
    block 0 must state the shifted list, not let the class derive [S, F, S] again."""
    config = config_of("gemma2", sliding_window=16, unstated=("layer_types",))
    assert layer_fields(config, "c").lists == {"layer_types": [S, F, S, F]}
    assert surgered_config(config, build_layer_map(4, drop=[0]), "c")["layer_types"] == [F, S, F]


def test_a_list_that_is_not_per_block_is_kept():
    config = config_of("qwen3", num_layers=2, eos_token_id=[1, 2])
    new = surgered_config(config, build_layer_map(2, duplicate=[1]), "c")
    assert new["eos_token_id"] == [1, 2] and new["layer_types"] == [F, F, F]


def test_qwen2_max_window_layers_is_restated_or_refused():
    config = config_of("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2,
                       unstated=("layer_types",))
    dropped = surgered_config(config, build_layer_map(4, drop=[0]), "config.json")
    assert dropped["layer_types"] == [F, S, S] and dropped["max_window_layers"] == 1
    duplicated = surgered_config(config, build_layer_map(4, duplicate=[1]), "config.json")
    assert duplicated["layer_types"] == [F, F, F, S, S] and duplicated["max_window_layers"] == 3
    with pytest.raises(NanoqError, match=r"^config.json: max_window_layers=2 sets blocks by their index, and no "
                                         r"value of it gives this surgery's blocks \(layer_types \['full_attention', "
                                         r"'sliding_attention', 'full_attention', 'sliding_attention'\]\); to go on, "
                                         r"write layer_types into config.json"):
        surgered_config(config, build_layer_map(4, swap=[(1, 2)]), "config.json")
    # stated layer_types govern (transformers reads them): the same exchange is then written, the pattern kept
    stated = surgered_config({**config, "layer_types": [F, F, S, S]}, build_layer_map(4, swap=[(1, 2)]), "c")
    assert stated["layer_types"] == [F, S, F, S] and stated["max_window_layers"] == 2


def test_gemma3_sliding_window_pattern_without_layer_types():
    config = config_of("gemma3_text", sliding_window=16, sliding_window_pattern=2, unstated=("layer_types",))
    assert surgered_config(config, build_layer_map(4, drop=[3]), "c")["layer_types"] == [S, F, S]  # pattern holds
    with pytest.raises(NanoqError, match=r"^c: sliding_window_pattern=2 sets blocks by their index"):
        surgered_config(config, build_layer_map(4, drop=[0]), "c")


def test_mlp_only_layers_are_renumbered():
    config = config_of("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       mlp_only_layers=[1, 3])
    new = surgered_config(config, build_layer_map(4, drop=[0], duplicate=[1]), "c")
    assert new["mlp_only_layers"] == [0, 1, 3]  # blocks 1, 1, 2, 3: the dense ones stay dense
    with pytest.raises(NanoqError, match=r"^c: mlp_only_layers should list block indices in 0..3, found \[4\]"):
        surgered_config({**config, "mlp_only_layers": [4]}, build_layer_map(4, drop=[0]), "c")


def test_a_field_that_sets_blocks_by_index_is_refused():
    """Qwen3-MoE's decoder_sparse_step=2 makes every second block sparse: dropping block 0 would turn block 1's
    experts into a dense MLP. The blocks are built on the meta device and compared."""
    config = config_of("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       decoder_sparse_step=2)
    assert surgered_config(config, build_layer_map(4, drop=[2, 3]), "c")["num_hidden_layers"] == 2
    with pytest.raises(NanoqError, match=r"^c: new block 0 \(source block 1\) would be built with mlp.class = "
                                         r"'Qwen3MoeMLP' instead of 'Qwen3MoeSparseMoeBlock': a config field sets "
                                         r"blocks by their index in a way surgery cannot rewrite$"):
        surgered_config(config, build_layer_map(4, drop=[0]), "c")


def test_config_that_disagrees_with_the_map():
    with pytest.raises(NanoqError, match=r"cfg: num_hidden_layers is 5 but the layer map is for 4 blocks"):
        surgered_config(config_of("llama", num_layers=5), build_layer_map(4, drop=[1]), "cfg")
    with pytest.raises(NanoqError, match=r"^cfg: transformers refuses this gemma2 config"):
        surgered_config(config_of("gemma2", layer_types=[S, F, S, F]) | {"layer_types": [S]},
                        build_layer_map(4, drop=[1]), "cfg")


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path, make_tiny_model, capsys):
    source = make_tiny_model("qwen2", tmp_path / "src", num_layers=4)
    config = json.loads((source / "config.json").read_text())
    del config["layer_types"]
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=2)
    (source / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["surgery", str(source), str(tmp_path / "out"), "--swap", "1:2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: max_window_layers=2 sets blocks by their index" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*nanoq-tmp*"))
    assert main(["surgery", str(source), str(tmp_path / "out"), "--drop", "0", "--quiet"]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == [F, S, S] and written["max_window_layers"] == 1
