# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minirlhf-installed

.PHONY: demo test install bench clean

demo: $(STAMP)
	$(VENV)/bin/minirlhf demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

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
	$(PY) benchmarks/classifier_imdb.py
	$(PY) benchmarks/generator_tweets.py
	$(PY) benchmarks/rlhf_demo.py
	$(PY) benchmarks/smollm2_sentiment.py
	$(PY) benchmarks/sentiment_rlhf.py

clean:
	rm -rf $(VENV) runs
