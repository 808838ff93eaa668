# Two commands for a fresh machine (Python 3.11 + a C compiler):
#   make demo   - create .venv, install, run the 4-bit diffusion demo (writes demo_out/)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel of torch first: a bare 'pip install torch' would pull GBs of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[diffusers,onnx,bench,test]"
	# deepcompressor's own Nunchaku converter makes the import tests' fixtures; pure Python,
	# and none of its declared dependencies (xformers, lm_eval, ...) is needed for that.
	$(PIP) install -q --no-deps deepcompressor-toolkit==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/svdq demo --out demo_out

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/svdq bench --quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache
