# The two commands a newcomer needs: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help setup pure run test lint loadtest bench bench-passthrough bench-cache bench-dedup bench-jobs bench-edge bench-front bench-tracing soak check clean

help:
	@echo "make run     start the example backend and the sidecar in front of it (:8080, admin :9901)"
	@echo "make test    run the whole test suite"
	@echo "make check   validate config.yaml"
	@echo "make lint    ruff and mypy"
	@echo "make pure    drop the compiled request path (SIDECAR_PURE=1 make setup keeps it so)"
	@echo "make loadtest  the SLAs of loadtests/slas.yaml against a running sidecar (make run)"
	@echo "make bench   benchmarks under loadtests/bench (nginx and wrk installed when missing)"
	@echo "make soak    10 minutes of mixed traffic with faults injected, then invariants checked"

# The modules compiled to C (sidecar/native.py): an edited one is rebuilt by the next make.
NATIVE := $(shell sed -n 's/^    "\(sidecar\/[^"]*\.py\)",$$/\1/p' sidecar/native.py)

$(STAMP): pyproject.toml setup.py mypyc.ini sidecar/native.py $(NATIVE)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); scripts/ensure-debian-packages python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@[ -n "$$SIDECAR_PURE" ] || $(BIN)/python -c 'from sidecar import native; \
		n, want = len(native.compiled()), len(native.COMPILED); \
		n < want and print(f"make: only {n} of {want} modules compiled; the others run interpreted. " \
		"See why: $(BIN)/python -m pip install -v -e . 2>&1 | grep sidecar:")'
	@touch $(STAMP)

setup: $(STAMP)
	@[ -n "$$SIDECAR_PURE" ] || $(BIN)/python -c 'import sys; from sidecar import native; \
		sys.exit(len(native.compiled()) < len(native.COMPILED) or bool(native.stale()))' \
		|| $(BIN)/python -m pip install --quiet -e '.[test]'
	@scripts/ensure-debian-packages redis-server

run: setup
	@scripts/run-demo

test: setup
	@scripts/ensure-debian-packages prometheus || echo "prometheus could not be installed: tests/test_prometheus.py will be skipped" >&2
	@scripts/ensure-debian-packages chromium chromium-driver || echo "chromium could not be installed: tests/test_dashboard.py will be skipped" >&2
	$(BIN)/python -m pytest

check: setup
	$(BIN)/sidecar check -c config.yaml

lint: setup
	$(BIN)/ruff check sidecar tests loadtests
	$(BIN)/mypy sidecar

loadtest: setup
	$(BIN)/sidecar loadtest -c loadtests/slas.yaml

bench: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/run_all.py

bench-passthrough: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/passthrough.py

bench-cache: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/cache_hit.py

bench-dedup: setup
	@scripts/ensure-debian-packages nginx
	$(BIN)/python loadtests/bench/dedup.py

bench-jobs: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/jobs.py

bench-edge: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/edge.py

bench-front: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/front.py

bench-tracing: setup
	@scripts/ensure-debian-packages nginx wrk
	$(BIN)/python loadtests/bench/tracing.py

soak: setup
	$(BIN)/python loadtests/soak.py

clean: pure
	rm -rf $(VENV) .sidecar .pytest_cache .ruff_cache build

# Back to the interpreted request path (profiling with py-spy, say): the compiled modules go,
# and the next `make setup` builds them again unless SIDECAR_PURE=1 is set.
pure:
	rm -f sidecar_native__mypyc.*.so $(NATIVE:.py=.*.so)
	rm -f $(STAMP)
