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


from tiny_models import FAMILY_SETTINGS, build_tiny_model  # noqa: E402,F401  (fixtures below use them)


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
def gemma3_dir() -> Path:
    """Gemma 3 270M written by `nanoq example-model --model gemma3-270m` (cached under .cache/); skipped unless its
    package is installed (`make install-gemma`: ~250 MB, not part of `make test`'s install)."""
    import importlib.util

    from nanoq_plugin.example_model import EXAMPLE_MODELS, write_example_model

    entry = EXAMPLE_MODELS["gemma3-270m"]
    target = CACHE / entry.name
    if not (target / "model.safetensors").is_file():
        if importlib.util.find_spec(entry.package) is None:
            pytest.skip(f"{entry.pin} is not installed (make install-gemma)")
        write_example_model(target, entry.name)
    return target


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """WikiText-2's test split, shipped with the tests."""
    return WIKITEXT
