# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build this machine keeps on disk; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,hub,serve,web

.PHONY: venv test test-slow demo lint clean browser

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# ruff first (fast), then the default test suite (slow tests are marked and excluded; run them with
# `make test-slow`). pytest's exit code 5 ("no tests collected") is not a failure of the code.
test: venv
	$(VENV)/bin/ruff check visualglm tests benchmarks
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The web UI test drives Debian's Chromium (Playwright's own browser download cannot be used here).
# Installs it with apt-get when missing (needs root, as in CI); the test fails under CI without it.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium fonts-liberation >/dev/null && test -x "$(CHROMIUM)" && echo "chromium installed: $(CHROMIUM)"; fi

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check visualglm tests benchmarks

demo: venv
	$(VENV)/bin/visualglm demo

clean:
	rm -rf $(VENV) build *.egg-info
