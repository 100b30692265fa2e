"""Runs after the other kernel tests (pytest takes files in name order): every kernel this machine should use, and
every kernel of ours its hardware runs, must have computed something in this session."""

import pytest
import torch

from nanoq_plugin.format.schemes import INT8_CHANNEL, INT8_DYNAMIC_A8, parse_scheme
from nanoq_plugin.kernels.cpu_isa import cpu_features, detect

from cpu_expectations import EXERCISED, OUR_CPU_KERNELS, expected_cpu_kernel, hardware_has

REPRESENTATIVES = [INT8_DYNAMIC_A8, INT8_CHANNEL, parse_scheme("int4g128"), parse_scheme("cb3g128")]
KERNEL_TEST_FILES = {"test_cpu_kernels.py", "test_int8_activations.py"}


def test_every_kernel_of_this_machine_was_exercised(request):
    collected = {item.path.name for item in request.session.items}
    if not KERNEL_TEST_FILES <= collected or request.config.option.keyword or request.config.option.markexpr:
        pytest.skip("checks what the whole kernel suite ran: run it with tests/kernels, unfiltered")
    best = {scheme.name: expected_cpu_kernel(scheme, torch.bfloat16) for scheme in REPRESENTATIVES}
    ours = {name for name in OUR_CPU_KERNELS if hardware_has(name)}
    line = (f"kernels exercised on this machine ({cpu_features().describe()}; hardware {detect().describe()}): "
            + ", ".join(f"{name} x{count}" for name, count in sorted(EXERCISED.items())))
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(line)
    missing_best = {scheme: name for scheme, name in best.items() if name != "reference" and not EXERCISED[name]}
    assert not missing_best, f"the best kernel for these schemes never ran: {missing_best}"
    assert not ours - set(EXERCISED), f"kernels this CPU runs that no test ran: {sorted(ours - set(EXERCISED))}"
