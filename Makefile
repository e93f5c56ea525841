PYTHON ?= python3
# A pipeline fails when any of its commands does (`pytest ... | tail -1` included).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The development and test environment, every file pinned and hashed (see lock/lockfile.py).
LOCK := lock/dev.txt
# uv, pinned and hashed in lock/uv.txt: it writes the lock and resolves the lowest and latest
# environments; the locked environment itself is installed by the Python's own pip.
TOOLS := .venv-tools
UV := $(TOOLS)/bin/uv
# The suite on the lowest and on the newest versions pyproject.toml allows (resolved by uv).
LOWEST := .venv-lowest
LATEST := .venv-latest
# The newest supported Python runs the latest versions when the machine has it (lock/pythons).
LATEST_PYTHON ?= $(shell lock/pythons 3.13 || echo $(PYTHON))

.PHONY: test test-lowest test-latest check-pythons lint promtool run bench soak lock lock-upgrade \
	check-lock clean

# Installed from the lock alone: exact versions, hashes required, no dependency resolution, wheels
# only (an sdist would build with whatever its own build requirements resolve to), the build
# backend from the lock too (no build isolation). A changed lock rebuilds the environment.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps --only-binary :all: -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Fails when pyproject.toml's dependency ranges changed without `make lock`.
check-lock: $(STAMP)
	$(BIN)/python lock/lockfile.py check

lint: $(STAMP) check-lock
	$(BIN)/ruff check syncd tests bench lock
	$(BIN)/ruff format --check syncd tests bench lock
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# promtool tests contrib/prometheus/syncd-rules.yml; installed when missing and possible.
promtool:
	contrib/prometheus/install-promtool

test: lint promtool
	$(BIN)/pytest -q

$(UV): lock/uv.txt
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --require-hashes --no-deps --only-binary :all: -r lock/uv.txt
	touch $(UV)

# The lock for pyproject.toml's ranges after a change to them: pins still allowed are kept.
lock: $(UV)
	$(PYTHON) lock/lockfile.py lock $(UV)

# Refresh the lock deliberately: the newest versions the ranges allow, uv's own pin too.
lock-upgrade: $(UV)
	$(UV) pip compile --quiet --universal --generate-hashes --upgrade \
		--custom-compile-command "make lock-upgrade" \
		lock/uv.in -o lock/uv.txt
	$(PYTHON) lock/lockfile.py lock $(UV) upgrade

# The suite on versions other than the lock's: exact pins compiled afresh each run (uv would
# keep the pins of an earlier run), then the locked mypy against that environment's packages
# (lock/mypy-ranges.ini), so that the code type-checks on every version in the ranges. The
# linters stay on the lock.
define other_env
	rm -f $(1)/requirements.txt
	$(UV) pip compile --quiet --python $(1)/bin/python $(2) --upgrade \
		--extra test --extra bench --extra postgres pyproject.toml -o $(1)/requirements.txt
	$(UV) pip sync --quiet --python $(1)/bin/python $(1)/requirements.txt
	$(UV) pip install --quiet --python $(1)/bin/python --no-deps -e .
	$(BIN)/mypy --config-file lock/mypy-ranges.ini --python-executable $(1)/bin/python \
		--cache-dir $(1)/.mypy_cache
	$(1)/bin/pytest -q -p no:cacheprovider
endef

$(LOWEST)/bin/python:
	$(PYTHON) -m venv $(LOWEST)

$(LATEST)/bin/python:
	$(LATEST_PYTHON) -m venv $(LATEST)

test-lowest: $(UV) $(STAMP) $(LOWEST)/bin/python promtool
	$(call other_env,$(LOWEST),--resolution lowest-direct)

test-latest: $(UV) $(STAMP) $(LATEST)/bin/python promtool
	$(call other_env,$(LATEST),--resolution highest)

# The lock installs, syncd starts and a part of the suite passes on every supported Python the
# machine has (lock/pythons; the whole locked suite runs on $(PYTHON)).
check-pythons: check-lock
	@for v in $$(sed -n 's/^SUPPORTED="\(.*\)"/\1/p' lock/pythons); do \
		lock/pythons $$v >/dev/null || echo "WARNING: Python $$v (supported) is not here: not checked"; \
	done
	@for py in $$(lock/pythons); do \
		env=$$(mktemp -d) && $$py -m venv $$env && \
		$$env/bin/python -m pip install --quiet --require-hashes --no-deps --only-binary :all: -r $(LOCK) && \
		$$env/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . && \
		$$env/bin/python -m pip check >/dev/null && $$env/bin/syncd --help >/dev/null && \
		$$env/bin/pytest -q -p no:cacheprovider tests/test_lock.py tests/test_publisher.py \
			tests/test_scheduler_due.py | tail -1 && \
		echo "$$($$py --version): the lock installs, syncd starts" && rm -rf $$env \
		|| { rm -rf $$env; exit 1; }; \
	done

run: $(STAMP)
	$(BIN)/python -m syncd demo

bench: $(STAMP)
	$(BIN)/python -m bench

# A fleet, Sentinel, the simulator and two consumers under random faults for SOAK_S seconds,
# then checked against the ground truth (bench/soak.py; SOAK_SEED repeats a run, SOAK_ARGS
# passes more options, e.g. "--deletes 0 --faults kill,failover").
SOAK_S ?= 600
SOAK_SEED ?=
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m bench.soak --seconds $(SOAK_S) $(if $(SOAK_SEED),--seed $(SOAK_SEED)) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) $(LOWEST) $(LATEST) .mypy_cache .pytest_cache .ruff_cache
