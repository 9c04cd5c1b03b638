# The two set-up commands: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test corpus install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,tfds,tb,peers,tpu]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# The default corpus: the King James Bible from Debian's bible-kjv (root + apt), else a notice;
# the demo then falls back to the interpreter's standard library sources.
corpus:
	@command -v bible >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends bible-kjv) >/dev/null 2>&1 \
	      || echo "notice: could not install bible-kjv; the demo will use the pystdlib corpus"; \
	  else echo "notice: bible-kjv is not installed (needs root + apt); the demo will use the pystdlib corpus"; fi; }

demo: install corpus
	$(BIN)/lmu-jax demo

test: install corpus
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
