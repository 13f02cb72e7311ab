# Two commands: `make demo` and `make test`. Both create .venv when it is absent.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The KV-store tests start their own redis-server (Debian/Ubuntu package) and make TLS certificates
# with openssl; apt via sudo when not root.
SUDO   := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	command -v redis-server >/dev/null && command -v openssl >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rcllm demo

test: $(STAMP) lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) feature_repo/data mlflow.db mlruns
