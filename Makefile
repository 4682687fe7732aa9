# The two commands of the README:  `make run`  and  `make test`.
# Both work on a fresh Debian machine as root: they install what is missing, then do their job.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKERS ?= 2
PORT ?= 8080

.PHONY: run serve test test-fast bench docs system install install-test image image-if-missing

run: install system  ## the main job: the HAProxy cluster on the demo model at http://127.0.0.1:$(PORT)
	$(VENV)/bin/vqa-async cluster --workers $(WORKERS) --port $(PORT)

serve: install  ## one process, no HAProxy
	$(VENV)/bin/vqa-async serve --port $(PORT)

test: install-test system docs image-if-missing  ## the whole suite (CI runs exactly this; under CI=true a skipped tool fails it)
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

# The container image (deploy/Containerfile, docs/container.md), CPU variant, built with podman on this box:
# `make image`. The GPU variant is the same file with its default base (the CUDA runtime image), built where a
# registry is reachable. What is specific to this kind of machine stays here, not in the Containerfile:
# - podman's settings for its cgroups and rlimits (deploy/podman/containers.conf: runc, no default ulimits);
# - the base: Debian bookworm made from Debian's packages by mmdebstrap and imported, as no registry answers;
# - pip inside the build: the proxy's CA bundle and the local wheel folders (`pip config list`), mounted
#   read-only, named by a pip.conf written here and mounted at /etc/pip.conf for the build only.
IMAGE ?= localhost/vqa-async:cpu
IMAGE_BASE ?= localhost/debian:bookworm-minbase
IMAGE_BUILD := build/image
PODMAN := CONTAINERS_CONF=$(CURDIR)/deploy/podman/containers.conf podman
IMAGE_PIP_CA ?= /etc/ssl/certs/ca-certificates.crt
# find-links: local wheels win over an index's copy of the same file (the torch wheels: 2.7 GB with CUDA's).
IMAGE_PIP_FIND_LINKS ?= $(wildcard /opt/wheels /opt/pypi-more/files /opt/pypi/files)
IMAGE_PIP_INDEXES ?= $(patsubst %,file://%,$(wildcard /opt/pypi/simple /opt/pypi-more/simple))
IMAGE_MOUNTS = $(foreach d,$(IMAGE_PIP_FIND_LINKS) $(patsubst file://%,%,$(IMAGE_PIP_INDEXES)),-v $(d):$(d):ro) \
	$(if $(wildcard $(IMAGE_PIP_CA)),-v $(IMAGE_PIP_CA):/run/build-ca.crt:ro) \
	-v $(CURDIR)/$(IMAGE_BUILD)/pip.conf:/etc/pip.conf:ro

image:  ## the CPU image $(IMAGE) (podman; installs podman, runc and mmdebstrap if missing)
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null; }
	mkdir -p $(IMAGE_BUILD)
	@if [ "$(IMAGE_BASE)" = localhost/debian:bookworm-minbase ] && ! $(PODMAN) image exists $(IMAGE_BASE); then \
	  echo "making $(IMAGE_BASE) from Debian's packages (mmdebstrap)"; \
	  mmdebstrap --variant=minbase --quiet bookworm $(IMAGE_BUILD)/base.tar \
	  && $(PODMAN) import -q $(IMAGE_BUILD)/base.tar $(IMAGE_BASE) && rm -f $(IMAGE_BUILD)/base.tar; fi
	{ echo '[global]'; \
	  $(if $(wildcard $(IMAGE_PIP_CA)),echo 'cert = /run/build-ca.crt';) \
	  $(if $(IMAGE_PIP_FIND_LINKS),echo 'find-links = $(IMAGE_PIP_FIND_LINKS)';) \
	  $(if $(IMAGE_PIP_INDEXES),echo 'extra-index-url = $(IMAGE_PIP_INDEXES)';) } > $(IMAGE_BUILD)/pip.conf
	$(PODMAN) build --network host -f deploy/Containerfile --ignorefile deploy/podman/containerignore \
	  --build-arg BASE=$(IMAGE_BASE) $(IMAGE_MOUNTS) -t $(IMAGE) .
	@# the previous build of the tag, and the layers only it used
	$(PODMAN) image prune -f >/dev/null
	@$(PODMAN) image inspect --format '$(IMAGE): {{.Size}} bytes' $(IMAGE)

image-if-missing:  ## `make test` builds the image once (tests/test_container.py runs it)
	@command -v podman >/dev/null && CONTAINERS_CONF=$(CURDIR)/deploy/podman/containers.conf podman image exists $(IMAGE) \
	  || $(MAKE) image
