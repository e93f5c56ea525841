PYTHON ?= python3
VENV := .venv
# A second environment with the lowest versions pyproject.toml allows (uv resolves them).
LOWEST := .venv-lowest
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-lowest lint promtool run bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check syncd tests bench
	$(BIN)/ruff format --check syncd tests bench
	$(BIN)/mypy

# promtool tests contrib/prometheus/syncd-rules.yml; installed when missing and possible.
promtool:
	contrib/prometheus/install-promtool

test: lint promtool
	$(BIN)/pytest -q

$(LOWEST)/bin/uv:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet 'uv>=0.4,<1'

# The suite on the lowest versions of the direct dependencies that pyproject.toml allows: exact
# pins, so versions left from an earlier run with other bounds are replaced.
test-lowest: $(LOWEST)/bin/uv promtool
	rm -f $(LOWEST)/requirements.txt  # uv would keep the pins of an earlier run
	$(LOWEST)/bin/uv pip compile --quiet --python $(LOWEST)/bin/python \
		--resolution lowest-direct --extra test --extra bench pyproject.toml \
		-o $(LOWEST)/requirements.txt
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python \
		-r $(LOWEST)/requirements.txt
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python --no-deps -e .
	$(LOWEST)/bin/pytest -q -p no:cacheprovider

run: $(STAMP)
	$(BIN)/python -m syncd demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(LOWEST) .mypy_cache .pytest_cache .ruff_cache
