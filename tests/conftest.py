"""Shared fixtures: tiny random-weight models of real architectures, the SmolLM2 example model, WikiText."""

from __future__ import annotations

import os

# Triton kernels are tested in Triton's CPU interpreter, which must be chosen before anything imports triton —
# and collecting test modules already does (transformers' model classes import it), so it is set here, first.
# On a GPU machine, `NANOQ_TRITON_DEVICE=cuda pytest tests/kernels/test_triton_*.py` compiles them for real.
if os.environ.get("NANOQ_TRITON_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tests" / "data" / "wikitext-2-raw" / "wiki.test.raw"  # CC BY-SA 3.0: tests/data/README.md
CACHE = Path(os.environ.get("NANOQ_TEST_CACHE", REPO / ".cache"))

TINY_ARCHS = ("llama", "qwen2", "qwen3")


# Per family, what makes a tiny model exercise its differences: explicit head_dim (Gemma, Qwen3), sliding and
# full attention layers, soft-capping (Gemma 2), Granite's multipliers.
FAMILY_SETTINGS = {
    "mistral": {"sliding_window": 16},
    "qwen3": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 32},
    "gemma3_text": {"head_dim": 32, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 32},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                "attention_multiplier": 0.1},
}


def build_tiny_model(arch: str, directory: Path, num_layers: int = 2, dtype=torch.bfloat16, seed: int = 0,
                     tie_word_embeddings: bool = False, vocab_size: int = 320) -> Path:
    """Save a tiny random-weight model of `arch` (any model_type transformers builds; hidden 96 so that group
    size 128 must fall back to 32), from transformers' own config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(FAMILY_SETTINGS.get(arch, {}))
    if "layer_types" in settings:
        settings["layer_types"] = (settings["layer_types"] * num_layers)[:num_layers]
    config = AutoConfig.for_model(
        arch, hidden_size=96, intermediate_size=256, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them differ so folds are seen
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, tmp_path) -> Path:
    """A tiny Llama / Qwen2 / Qwen3 checkpoint folder (bfloat16, random weights)."""
    return build_tiny_model(request.param, tmp_path / f"tiny-{request.param}")


@pytest.fixture
def make_tiny_model():
    """`build_tiny_model` for tests that need other settings (e.g. tied embeddings)."""
    return build_tiny_model


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return build_tiny_model("llama", tmp_path / "tiny-llama")


@pytest.fixture(scope="session", autouse=True)
def record_exercised_kernels():
    """Count every kernel `apply` the session runs into `cpu_expectations.EXERCISED` (a kernel test at the end
    checks that this machine's kernels all ran); printed in the summary."""
    from cpu_expectations import EXERCISED

    from nanoq_plugin.kernels.dispatch import KERNELS

    wrapped = set()
    for kernel in KERNELS.values():
        owner = next(cls for cls in type(kernel).__mro__ if "apply" in cls.__dict__)
        if owner in wrapped:
            continue
        wrapped.add(owner)

        def apply(self, x, prepared, config, _original=owner.apply):
            EXERCISED[self.name] += 1
            return _original(self, x, prepared, config)

        owner.apply = apply
    yield


@pytest.fixture
def cpu_cap(monkeypatch):
    """`cpu_cap(name)` sets `NANOQ_CPU_ISA` for one test (`None`: no cap), so that a kernel's own tests run whatever
    the dispatcher was told, and the AVX2 kernels run on an AVX-512 machine as on an AVX2 one."""
    from nanoq_plugin.kernels.cpu_isa import ENV_CAP, cpu_features

    def set_cap(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(ENV_CAP, raising=False)
        else:
            monkeypatch.setenv(ENV_CAP, name)
        cpu_features.cache_clear()

    yield set_cap
    cpu_features.cache_clear()  # recomputed on next use, after monkeypatch restores the variable


@pytest.fixture
def uncapped(cpu_cap):
    """No `NANOQ_CPU_ISA` cap for this test."""
    cpu_cap(None)


def pytest_terminal_summary(terminalreporter):
    from cpu_expectations import EXERCISED

    from nanoq_plugin.kernels.cpu_isa import cpu_features

    if EXERCISED:
        ran = ", ".join(f"{name} ({count})" for name, count in sorted(EXERCISED.items()))
        terminalreporter.write_line(f"kernels exercised on this machine ({cpu_features().describe()}): {ran}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct written by `nanoq example-model` (built once, cached under .cache/)."""
    from nanoq_plugin.example_model import write_example_model

    target = CACHE / "smollm2"
    if not (target / "model.safetensors").is_file():
        write_example_model(target)
    return target


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """WikiText-2's test split, shipped with the tests."""
    return WIKITEXT
