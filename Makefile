# lensbench: `make demo` runs the main job, `make test` runs the tests. Both create .venv on first
# use and install the pinned dependencies (constraints.txt) with the package itself in editable mode.

PYTHON ?= python3
VENV := .venv
# Reinstall only when the dependency declarations change (or the venv is new).
STAMP := $(VENV)/.lensbench-installed

.PHONY: venv demo test test-slow clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "lensbench needs Python >= 3.11 (set PYTHON=python3.11)" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/lensbench demo

# Two test files at a time (pytest-xdist; whole files, so module fixtures and their background
# workers run once): one process mostly compiles on one core, which leaves the other idle. Files
# start in tests/conftest.py's order (the slowest first), not xdist's (the most tests first).
# `make test` (what CI runs) leaves out the tests marked slow: end-to-end checks whose parts,
# or whose property on another problem, the rest of the suite proves (tests/conftest.py lists
# them and why); `make test-slow` runs those.
PYTEST := $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: venv
	$(PYTEST) -m "not slow"

test-slow: venv
	$(PYTEST) -m slow

clean-venv:
	rm -rf $(VENV)
