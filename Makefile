# umig: top-level Makefile.
#
# On a fresh Debian machine with Python, gcc, make and apt, `make demo` and `make test`
# do all the set-up themselves (a virtualenv in .venv/, the package installed editable,
# the restorer built, iproute2 for the tests). Both need root.
#
#   make install     .venv/ + `pip install -e '.[test,bench]'` + the restorer (quick when done)
#   make demo        migrate a ticking process between two agents on this host
#   make test        run the test suite (pytest)
#   make bench       benchmark harness (docs/performance.md); BENCH_ARGS=--quick for a tiny run
#   make bounds      what bounds stop-and-copy's throughput here: each stage timed alone
#   make experiment  scheduling policies on emulated nodes (docs/scheduling.md)
#   make clean       remove build products (keeps .venv/); distclean also removes .venv/

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Rewritten whenever the package has to be (re)installed into the venv.
STAMP := $(VENV)/.umig-installed
# Where the package looks for its restorer (an editable install uses the source tree).
RESTORER_BIN := $(CURDIR)/umig/bin/umig-restorer

PYTEST_ARGS ?=
BENCH_ARGS ?=
# Set to 1 to treat "pytest collected no tests" (exit 5) as success.
ALLOW_NO_TESTS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

# $(call apt_install,PACKAGES): install Debian packages when we are root and have
# apt-get; fails (without installing) otherwise.
define apt_install
if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	echo "==> installing $(1) with apt-get"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
else \
	echo "==> cannot install $(1): need root and apt-get; please install it" >&2; \
	false; \
fi
endef

.PHONY: all help install restorer system-deps demo test bench bounds experiment clean distclean

all: install

help:
	@sed -n '3,12p' Makefile | sed 's/^# \{0,1\}//'

install: $(STAMP) restorer

# A virtualenv needs ensurepip, which Debian ships separately (python3-venv).
$(VENV_PY):
	@rm -rf $(VENV)
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		ver=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		pkgs=python3-venv; \
		if apt-cache show "python$$ver-venv" >/dev/null 2>&1; then pkgs="$$pkgs python$$ver-venv"; fi; \
		$(call apt_install,$$pkgs); \
	fi
	$(PYTHON) -m venv $(VENV)

# Reinstall when the packaging changes. The editable install also builds the restorer
# (setup.py runs `make -C restorer OUTPUT=umig/bin/umig-restorer`).
$(STAMP): setup.py pyproject.toml umig/__init__.py | $(VENV_PY)
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL $(VENV_PY) -m pip install -q -e '.[test,bench]'
	@touch $@

# Always delegate: the restorer's own Makefile knows its sources and rebuilds only
# when they change.
restorer: | $(STAMP)
	@mkdir -p $(dir $(RESTORER_BIN))
	$(MAKE) --no-print-directory -C restorer OUTPUT=$(RESTORER_BIN)

# The tests build network namespaces with `ip netns` (iproute2).
system-deps:
	@if ! command -v ip >/dev/null 2>&1 && [ ! -x /usr/sbin/ip ] && [ ! -x /sbin/ip ]; then \
		$(call apt_install,iproute2) || echo "==> warning: no iproute2; tests that need ip netns will fail or skip" >&2; \
	fi

demo: install
	$(VENV_PY) -m umig.demo

test: install system-deps
	@[ "$$(id -u)" = 0 ] || echo "==> warning: the tests need root (ptrace, namespaces); expect skips or failures" >&2
	@echo "$(strip $(VENV_PY) -m pytest -q $(PYTEST_ARGS) tests)"
	@rc=0; $(VENV_PY) -m pytest -q $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc = 5 ] && [ -n "$(ALLOW_NO_TESTS)" ]; then \
		echo "==> pytest collected no tests"; rc=0; \
	fi; \
	exit $$rc

bench: install
	@[ "$$(id -u)" = 0 ] || echo "==> warning: the benchmark needs root (ptrace, namespaces)" >&2
	$(VENV_PY) benchmarks/bench.py $(BENCH_ARGS)

bounds: install
	$(VENV_PY) benchmarks/bounds.py

# EXPERIMENT_ARGS=--quick for the smoke-test variant.
EXPERIMENT_ARGS ?=
experiment: install system-deps
	$(VENV_PY) experiments/experiment.py $(EXPERIMENT_ARGS)

clean:
	-@[ ! -f restorer/Makefile ] || $(MAKE) --no-print-directory -C restorer clean
	rm -rf build dist *.egg-info umig/bin .pytest_cache benchmarks/results experiments/results
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
