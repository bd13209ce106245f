# Two commands for a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-report

.PHONY: venv demo test lint docs bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mixprec formats
	$(BIN)/mixprec formats explain 0.001 --format fp16 --format bf16 --format fp8_e4m3fn
	$(BIN)/mixprec bench --task gpt --size small --steps 30 --budget 3x --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard src tests benchmarks examples)

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

test: lint
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(DEMO_OUT) site build dist .pytest_cache .ruff_cache
