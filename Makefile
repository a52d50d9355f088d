# Entry points: `make test` runs the tests, `make book` executes the chapters and builds the
# book, `make check-book` opens every built page in headless Chromium. Each target creates
# .venv with $(PYTHON) when it is missing and reinstalls the package when pyproject.toml
# changes (the install stamp carries a hash of pyproject.toml).

PYTHON ?= python3.11
VENV ?= .venv
PROFILE ?= ci
# Sphinx warnings (a missing glue key, a broken reference) fail the build; set BOOK_FLAGS=
# to see them as warnings only.
BOOK_FLAGS ?= --warningiserror --keep-going

PY := $(VENV)/bin/python
PYPROJECT_HASH := $(shell (sha256sum pyproject.toml 2>/dev/null || shasum -a 256 pyproject.toml) | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)
KERNEL_STAMP := $(VENV)/.kernel-registered

.PHONY: test book check-book clean help

help:
	@echo "make test        run the test suite (pytest)"
	@echo "make book        execute the chapters (PROFILE=$(PROFILE)) and build _build/html"
	@echo "make check-book  check every built page in headless Chromium, screenshots in _build/screenshots"
	@echo "make clean       remove _build and the executed notebooks"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	$(PY) -m pip install -e ".[book,test]"
	rm -f $(VENV)/.installed-*
	touch $@

$(KERNEL_STAMP): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (diffinv)"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# --all rewrites every page: an incremental build keeps the old sidebar on unchanged pages.
book: $(STAMP) $(KERNEL_STAMP)
	$(PY) book/tools/execute.py --profile $(PROFILE)
	$(VENV)/bin/jupyter-book build . --all $(BOOK_FLAGS)

check-book: $(STAMP)
	$(PY) book/tools/check_rendered.py

clean:
	rm -rf _build notebooks/_executed
