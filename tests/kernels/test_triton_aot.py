"""Every Triton kernel variant compiles to a cubin for sm_90 (H100 / H200) on this GPU-less machine.

The interpreter tests run the kernels' Python bodies, which once accepted a plain-int global that the compiler
rejects: every kernel failed its first GPU launch. This compiles them for real (Triton ships `ptxas`), in a
subprocess without TRITON_INTERPRET (conftest sets it for this process)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from nanoq_plugin.kernels.triton_aot import FORMATS, HOPPER_MAX_SHARED, MOE_FORMATS  # noqa: E402


@pytest.fixture(scope="module")
def reports():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "nanoq_plugin.kernels.triton_aot", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_sm90(reports):
    failed = [f"{r['kernel']} {r['format']} {r['act_dtype']} {r['block_m']}x{r['block_n']}x{r['block_k']}: {r['error']}"
              for r in reports if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["format"] for r in reports if r["kernel"] == "gemm"} == {label for label, *_ in FORMATS}
    for kernel in ("embedding", "dequantize"):
        assert {r["format"] for r in reports if r["kernel"] == kernel} == {label for label, *_ in FORMATS}


def test_grouped_moe_kernel_compiles_for_every_format_it_serves(reports):
    """Both launches of the grouped MoE kernel (triton_moe), every format it serves; 16-bit activations reach the
    tensor cores (warpgroup MMAs from 64-row blocks on, as the dense prefill tiles)."""
    for kernel in ("moe-w13", "moe-w2"):
        assert {r["format"] for r in reports if r["kernel"] == kernel} == set(MOE_FORMATS)
    moe = [r for r in reports if r["kernel"].startswith("moe-")]
    assert {r["block_m"] for r in moe} >= {16, 64}
    for r in moe:
        assert r["ok"], r
        if r["act_dtype"] != "fp32":
            assert r["mma"] == ("wgmma" if r["block_m"] >= 64 else "mma.sync"), r


def test_tiles_fit_hopper_shared_memory_and_use_tensor_cores(reports):
    for r in reports:
        assert r["shared"] <= HOPPER_MAX_SHARED, f"{r}: {r['shared']} bytes of shared memory cannot launch"
        if r["kernel"] == "gemm" and r["act_dtype"] != "fp32":
            # prefill tiles (M >= 64) and weight-first decode tiles (the weight fills the MMA's 64-row side) get
            # Hopper's warpgroup MMA; decode's 16-row tiles mma.sync
            assert r["mma"] == ("wgmma" if r["block_m"] >= 64 or r["swap_ab"] else "mma.sync"), r


def test_weight_first_tiles_store_the_dequantized_weight_in_16_byte_vectors(reports):
    """The point of weight-first tiles: each thread unpacks whole words along K, so the tile reaches the MMA in
    16-byte shared stores (decode) or straight from registers (prefill), never one 2-byte element per store.
    A [1, BLOCK_N] scale load once turned that into 128 2-byte stores per thread."""
    swapped = [r for r in reports if r["kernel"] == "gemm" and r["swap_ab"] and r["act_dtype"] == "bf16"
               and not r["format"].startswith(("cb", "int8"))]
    assert swapped
    for r in swapped:
        assert r["shared_stores_b16"] <= 1, r
        if r["block_m"] == 16:
            assert r["shared_stores_v4"] >= 8, r
