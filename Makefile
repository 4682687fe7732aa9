# The two commands of the README:  `make run`  and  `make test`.
# Both work on a fresh Debian machine as root: they install what is missing, then do their job.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKERS ?= 2
PORT ?= 8080

.PHONY: run serve test test-fast bench docs system install install-test

run: install system  ## the main job: the HAProxy cluster on the demo model at http://127.0.0.1:$(PORT)
	$(VENV)/bin/vqa-async cluster --workers $(WORKERS) --port $(PORT)

serve: install  ## one process, no HAProxy
	$(VENV)/bin/vqa-async serve --port $(PORT)

test: install-test system docs  ## the whole suite (CI runs exactly this; under CI=true a skipped tool fails it)
	$(VENV)/bin/ruff check vqa_async tests bench tools
	$(VENV)/bin/mypy vqa_async
	$(PY) -m pytest

test-fast: install-test  ## the first tiers: tests/unit (no model, no process) and tests/app (in-process)
	$(PY) -m pytest tests/unit tests/app -q

bench: install-test system  ## baseline, serve, cluster, ceiling and LitServe on new uploads, demo model -> bench/out
	$(PY) -m bench sweep --systems baseline,serve,cluster,ceiling,litserve --concurrency 1,8,32,100 \
	  --workload distinct --repeats 3 --requests 600 --out bench/out

docs: install-test  ## the manual (docs/, mkdocs.yml) built strictly into site/: a broken link or anchor fails it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

system:  ## Debian packages: HAProxy (the front), Chromium + driver (page tests), ab (load checks),
         ## iproute2 (ip, tc) + dnsmasq (network-namespace hosts and DNS discovery in tests/system/test_fleet.py),
         ## curl and openssl (the TLS tests speak to the servers with them), systemd-analyze (the unit file's check)
	@if ! command -v haproxy >/dev/null || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] \
	    || ! command -v dnsmasq >/dev/null || ! command -v ip >/dev/null || ! command -v tc >/dev/null \
	    || ! command -v curl >/dev/null || ! command -v openssl >/dev/null || ! command -v ab >/dev/null \
	    || ! command -v systemd-analyze >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy chromium chromium-driver \
	    apache2-utils iproute2 dnsmasq-base curl openssl systemd >/dev/null; fi

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch and torchvision first, pinned together: PyPI's torchvision imports only beside its own torch, and
# these two releases lie on this machine's disk (a plain `torch` would fetch a multi-GB build).
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[otel]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
