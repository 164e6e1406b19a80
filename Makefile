# Two entry points (see README): `make demo` and `make test`. Both set up .venv first; the set-up
# re-runs only when pyproject.toml changes, so repeated calls are fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo mitigations test docs lint bench system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Chromium and pdftoppm are only needed by the report tests (real browser, PDF pages).
system-deps:
	@command -v chromium >/dev/null && command -v pdftoppm >/dev/null && test -d /usr/share/fonts/truetype/dejavu || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils fonts-dejavu-core >/dev/null)

demo: $(STAMP)
	$(BIN)/audit demo --out reports/demo

# The mitigations audit (README "Mitigations: from finding to fix"): several models trained, minutes.
MITIGATION_DATA := datasets/doctor_nurse_95/manifest.csv
$(MITIGATION_DATA): | $(STAMP)
	$(BIN)/audit data doctor-nurse --out $(dir $@) --doctor-male 0.95 --nurse-female 0.95 --overwrite

mitigations: $(STAMP) $(MITIGATION_DATA)
	$(BIN)/audit run examples/mitigations.toml --out reports/mitigations --force

# The documentation site (docs/, mkdocs.yml) into site/; the config reference is generated from the code.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check audit tests benchmarks docs/hooks
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $$(mktemp -d)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_explain.py
