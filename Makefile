# The two commands: `make run` (the main job) and `make test` (the whole suite).
# Both create .venv and install the project on first use; later calls reuse it.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install run run-text test test-fast lint bench docs clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so a second call is a quick no-op.
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"  # the tested versions (pyproject: lower bounds)
	touch $(STAMP)

run: install
	$(PY) scripts/transfer_study.py

# The same study on text: MLM pre-training on Python's own documentation, then docstrings by package family
run-text: install
	$(PY) scripts/transfer_study.py --config-name transfer_study_text

# Two pytest workers (pytest-xdist), each on its share of the cores; a test file's tests stay on one worker, so a
# module's fixture is made once. TEST_WORKERS=0: one process, as plain `pytest` runs.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# pretune vs a plain PyTorch loop (steps/s, peak memory, loader, start-up): outputs/bench/<timestamp>/bench.md
bench: install
	$(PY) scripts/benchmark.py

# The manual (docs/, mkdocs.yml) as a site in site/; strict: a broken link fails (make test checks the same)
docs: install
	$(PY) -m mkdocs build --strict -d site

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf outputs multirun lightning_logs wandb .pytest_cache site
