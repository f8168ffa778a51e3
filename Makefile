# The two commands a new user needs (see README):
#   make run    set up both venvs, then start engine + backend on :9090
#   make test   set up both venvs, then run the whole test suite (unit, real engine, e2e)
.PHONY: setup run test tiny-model bench clean

VENV ?= .venv
PYTEST_ARGS ?=

setup:
	@scripts/setup.sh all

run: setup
	$(VENV)/bin/dataengine serve

test: setup
	@scripts/setup.sh test-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

tiny-model: setup
	$(VENV)/bin/dataengine make-tiny-model models/tiny

bench: setup
	$(VENV)/bin/python bench/predict.py

clean:
	rm -rf .venv .venv-engine .venv-labelstudio .pytest_cache
