# The two commands of the README. Each creates .venv on first use (and again when pyproject.toml changes).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

demo: $(STAMP)
	$(VENV)/bin/qlora-bridge train --out qlora-bridge-out/adapter --force
	$(VENV)/bin/qlora-bridge merge --adapter qlora-bridge-out/adapter --out qlora-bridge-out/merged --force
	$(VENV)/bin/qlora-bridge export --target gguf --quant Q4_K_M --merged qlora-bridge-out/merged \
		--out qlora-bridge-out/gguf-Q4_K_M --force
	$(VENV)/bin/qlora-bridge smoke qlora-bridge-out/gguf-Q4_K_M

test: $(STAMP)
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

# torch goes first, pinned, so pip takes the local CPU build instead of resolving a CUDA one.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install -q -e '.[test,gguf]'
	touch $(STAMP)

clean:
	rm -rf $(VENV)
