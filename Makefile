# The README's two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and installs what it needs; later runs reuse it.
# Plain POSIX sh and GNU make 3.81 features only (macOS ships make 3.81).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_PROMPT ?= Once upon a time
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1

.DEFAULT_GOAL := help
.PHONY: help demo test

help:
	@echo "make demo   serve the built-in model in the background, stream a story, stop"
	@echo "make test   ruff, mypy --strict ffai_client, pytest -q"
	@echo "Both create $(VENV) with $(PYTHON) (>= 3.11) on first use."

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	{ echo "make: $(PYTHON) is older than 3.11; try: make PYTHON=python3.12 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Stamps: pip runs again only when the packaging or the native sources change.
# '.[dev]' includes '.[worker]'.
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard ffai_worker/native/kernels/*)
$(VENV)/.installed-worker: $(INSTALL_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[worker]'
	@touch $@

$(VENV)/.installed-dev: $(INSTALL_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed-worker

# A worker on a private ipc socket, a client streaming from it, and the worker
# stopped with SIGTERM on every exit path (success, failure, Ctrl-C).
demo: $(VENV)/.installed-worker
	@set -e; pid=; dir=$$(mktemp -d /tmp/ffai-demo.XXXXXX); ep="ipc://$$dir/worker.sock"; \
	stop() { \
	    st=$$?; set +e; \
	    if [ -n "$$pid" ]; then kill $$pid 2>/dev/null; wait $$pid; fi; \
	    awk 'f; /serving on/ {f=1}' "$$dir/worker.log"; rm -rf "$$dir"; exit $$st; \
	}; \
	trap stop EXIT; trap 'exit 130' INT TERM; \
	: >"$$dir/worker.log"; \
	$(BIN)/ffai-worker serve --endpoint "$$ep" 2>>"$$dir/worker.log" & pid=$$!; \
	n=0; until grep -q "serving on" "$$dir/worker.log"; do \
	    if ! kill -0 $$pid 2>/dev/null || [ $$n -ge 1200 ]; then \
	        cat "$$dir/worker.log" >&2; echo "make demo: the worker did not start" >&2; exit 1; \
	    fi; n=$$((n + 1)); sleep 0.1; \
	done; \
	cat "$$dir/worker.log"; \
	echo "\$$ ffai generate --max-tokens 80 --temperature 0 \"$(DEMO_PROMPT)\""; \
	$(BIN)/ffai generate --endpoint "$$ep" --timeout 60 --max-tokens 80 --temperature 0 \
	    "$(DEMO_PROMPT)"

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy --strict ffai_client
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q
