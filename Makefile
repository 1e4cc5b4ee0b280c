# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build this machine keeps on disk; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,hub

.PHONY: venv test demo lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check visualglm tests benchmarks

demo: venv
	$(VENV)/bin/visualglm demo

clean:
	rm -rf $(VENV) build *.egg-info
