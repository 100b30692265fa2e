"""What the CPU dispatcher believes and does: the ISA read once and capped by NANOQ_CPU_ISA, the kernel chosen for
each scheme on this machine and under every cap it reaches, one log line per scheme, the warning when only the
reference fits, and NANOQ_STRICT_KERNELS."""

import pytest
import torch

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.schemes import INT8_CHANNEL, INT8_DYNAMIC_A8, parse_scheme
from nanoq_plugin.kernels import cpu_isa, dispatch, ops
from nanoq_plugin.kernels.base import LinearConfig

from cpu_expectations import expected_cpu_kernel
from schemes_under_test import stored_and_reference

SCHEMES = [INT8_DYNAMIC_A8, INT8_CHANNEL, parse_scheme("int4g128"), parse_scheme("cb3g128"), parse_scheme("cb4g64")]
REACHABLE_CAPS = [cap for cap in cpu_isa.CAPS
                  if cap in ("native", "none") or getattr(cpu_isa.detect(), cap)]


@pytest.fixture
def cap(monkeypatch):
    """`cap(name)` sets NANOQ_CPU_ISA for this test (and forgets which schemes were already reported)."""
    def set_cap(name: str):
        monkeypatch.setenv(cpu_isa.ENV_CAP, name)
        cpu_isa.cpu_features.cache_clear()
        monkeypatch.setattr(dispatch, "_reported", set())
    yield set_cap
    cpu_isa.cpu_features.cache_clear()


def test_caps_only_remove_instructions():
    hardware = cpu_isa.detect()
    for name in REACHABLE_CAPS:
        capped = cpu_isa.apply_cap(hardware, name)
        for flag in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx"):
            assert getattr(capped, flag) <= getattr(hardware, flag), (name, flag)
    assert cpu_isa.apply_cap(hardware, "avx2").best_isa in ("avx2", "none")
    assert cpu_isa.apply_cap(hardware, "none").best_isa == "none"


def test_a_cap_the_cpu_does_not_reach_or_an_unknown_one_is_refused():
    no_avx512 = cpu_isa.CpuFeatures(model="test", avx2=True)
    with pytest.raises(NanoqError, match=r"NANOQ_CPU_ISA=avx512 asks for instructions this CPU lacks"):
        cpu_isa.apply_cap(no_avx512, "avx512")
    with pytest.raises(NanoqError, match=r"NANOQ_CPU_ISA='sse9' is not one of native, avx512_vnni"):
        cpu_isa.apply_cap(no_avx512, "sse9")


def test_aarch64_has_no_kernel_isa_of_ours(monkeypatch):
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "aarch64")
    features = cpu_isa.detect()
    assert features.best_isa == "none" and features.label == "none"


@pytest.mark.parametrize("cap_name", REACHABLE_CAPS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_each_scheme_gets_the_kernel_its_isa_allows(cap, cap_name, scheme):
    cap(cap_name)
    k = 256
    config = LinearConfig(scheme, 128, k, torch.bfloat16, "cpu")
    assert dispatch.select_kernel(config).name == expected_cpu_kernel(scheme, torch.bfloat16)


def nanoq_lines(capsys) -> list[str]:
    """The `nanoq: ` lines the kernel logger wrote to stderr since the last call."""
    return [line.removeprefix("nanoq: ") for line in capsys.readouterr().err.splitlines() if line.startswith("nanoq: ")]


def test_the_kernel_of_each_scheme_is_logged_once(cap, capsys):
    cap("native")
    scheme, tensors, _ = stored_and_reference("int4g128", 64, 256, 0)
    capsys.readouterr()
    for _ in range(3):
        ops.prepare_linear(tensors, scheme, 64, 256, torch.bfloat16, "cpu")
    assert nanoq_lines(capsys) == [f"scheme int4g128 (bfloat16 activations) on {cpu_isa.cpu_features().describe()}: "
                                   f"kernel {expected_cpu_kernel(scheme, torch.bfloat16)}"]


def test_the_reference_fallback_warns_once_and_strict_mode_refuses(cap, capsys, monkeypatch):
    cap("none")
    scheme = parse_scheme("cb3g128")
    from nanoq_plugin.quantizers.codebook import quantize_codebook

    tensors = quantize_codebook(torch.randn(64, 256), scheme)
    capsys.readouterr()
    for layer in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"):
        prepared = ops.prepare_linear(tensors, scheme, 64, 256, torch.bfloat16, "cpu", where=layer)
    assert prepared.kernel == "reference"
    warnings = [line for line in nanoq_lines(capsys) if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: scheme cb3g128 (bfloat16 activations) on ")
    assert "runs the reference kernel" in warnings[0] and "slower" in warnings[0]
    assert "model.layers.0.mlp.up_proj" in warnings[0] and "cpu_codebook: needs AVX-512" in warnings[0]
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(NanoqError, match=r"model.x: scheme cb3g128 has no fast kernel on this CPU .*"
                                         r"NANOQ_STRICT_KERNELS is set"):
        ops.prepare_linear(tensors, scheme, 64, 256, torch.bfloat16, "cpu", where="model.x")


def test_strict_mode_accepts_every_layer_a_fast_kernel_runs(cap, monkeypatch):
    cap("native")
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    scheme, tensors, _ = stored_and_reference("int4g128", 64, 256, 1)
    assert ops.prepare_linear(tensors, scheme, 64, 256, torch.bfloat16, "cpu").kernel == expected_cpu_kernel(
        scheme, torch.bfloat16)


def test_transformers_load_warns_or_refuses_a_layer_without_a_fast_kernel(cap, monkeypatch, tmp_path,
                                                                          make_tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    import nanoq_plugin  # noqa: F401  (registers the "nano" quantization method)
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    source = make_tiny_model("llama", tmp_path / "src")
    quantize_checkpoint(source, tmp_path / "nano", load_recipe("cb3g128"), progress=False)
    cap("none")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nano", dtype=torch.bfloat16)
    assert model is not None
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanoq: warning: scheme cb")]
    assert len(warnings) == len({line.split()[3] for line in warnings}) >= 1  # one line per scheme
    monkeypatch.setattr(dispatch, "_reported", set())
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(NanoqError, match=r"has no fast kernel on this CPU"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nano", dtype=torch.bfloat16)


def test_the_engines_pre_check_refuses_under_strict_mode_only(cap, monkeypatch):
    """`refuse_slow_layers` (vLLM's API server, before loading) asks what each layer's prepare will ask: a table
    needs a kernel that also looks up rows, and no int4 kernel does."""
    cap("native")
    int4 = parse_scheme("int4g128")
    dispatch.refuse_slow_layers([("model.embed_tokens", int4, 320, 256, True)], torch.bfloat16, "cpu")  # not strict
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    dispatch.refuse_slow_layers([("model.layers.0.mlp.up_proj", int4, 320, 256, False)], torch.bfloat16, "cpu")
    with pytest.raises(NanoqError, match=r"model.embed_tokens: scheme int4g128 has no fast kernel on this CPU .*"
                                         r"cannot look up embedding rows"):
        dispatch.refuse_slow_layers([("model.embed_tokens", int4, 320, 256, True)], torch.bfloat16, "cpu")
