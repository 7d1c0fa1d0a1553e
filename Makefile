# sidecar: every target does its own set-up on a fresh machine.
#   make run     start the sidecar on its defaults (data :8090, admin :8091)
#   make test    the whole test suite, real llama-server included
#   make bench   the benchmarks (direct vs nginx vs sidecar, and the rest)
#   make lint    ruff and mypy

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := nginx wrk chromium prometheus curl
DEB_STAMP := $(VENV)/.debs

.PHONY: install run test bench lint debs llama-server clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests and benchmarks drive: nginx and wrk (baselines),
# chromium (dashboard test), prometheus (promtool), curl.
$(DEB_STAMP): | $(STAMP)
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	touch $(DEB_STAMP)

debs: $(DEB_STAMP)

# Builds llama-server from source once (about 20 minutes on two cores) and
# caches the wheel in ~/.cache/sidecar, so later runs only install it.
llama-server: $(STAMP)
	scripts/llama-server ensure

run: $(STAMP)
	$(VENV)/bin/sidecar serve

test: $(STAMP) $(DEB_STAMP) llama-server
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) $(DEB_STAMP) llama-server
	$(PY) -m bench.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/mypy sidecar

clean:
	rm -rf $(VENV) .sidecar-data
