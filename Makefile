# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minirlhf-installed

.PHONY: demo test test-fast install bench clean chromium

demo: $(STAMP)
	$(VENV)/bin/minirlhf demo

# One test process per core (pytest-xdist), each test going to whichever is free; tests/conftest.py gives each one
# thread, so the processes and the runs they start share the cores without oversubscribing them.
test: $(STAMP) chromium
	$(PY) -m pytest -n auto --dist worksteal $(PYTEST_ARGS)

# The quick tier (tests/conftest.py FAST_FILES): units, math against naive loops, parsing, the package's shape.
test-fast: $(STAMP)
	$(PY) -m pytest -m fast $(PYTEST_ARGS)

# The feedback page's browser tests drive Debian's chromium: installed here with apt-get when missing and we
# may (root, or sudo without a password). Never fails the build; the tests then skip, or fail under CI=true.
APT_CHROMIUM := env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null 2>&1
chromium:
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT_CHROMIUM); \
	  elif sudo -n true 2>/dev/null; then sudo -n $(APT_CHROMIUM); fi; \
	  test -x /usr/bin/chromium || echo "chromium not installed (needs root or sudo -n): the browser tests will skip (fail under CI=true)"; }

install: $(STAMP)

# Re-installs only when the pins change; a second `make` goes straight to the run.
$(STAMP): requirements.txt requirements-offline.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks.classifier_imdb
	$(PY) -m benchmarks.generator_tweets
	$(PY) -m benchmarks.rlhf_demo
	$(PY) -m benchmarks.smollm2_sentiment
	$(PY) -m benchmarks.sentiment_rlhf

clean:
	rm -rf $(VENV) runs
