# The two commands: `make serve` and `make test`. Both install into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test fuzz bench protos lint clean-venv

$(STAMP): pyproject.toml scripts/install.sh
	EDITABLE=1 scripts/install.sh $(VENV) train,dev
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/rnn-serve --models models

# Two workers, one test file each at a time (a file's fixtures are built once): most tests wait on real
# servers and processes, so two files at once fit on 2 cores (about 4.7 minutes here against 6-6.5 in one).
# TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

# The long fuzz and abuse campaign (a bounded version runs in `make test`).
fuzz: $(STAMP)
	RNNSERVE_FUZZ=long $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: $(STAMP)
	$(PY) bench/train_bench.py
	$(PY) bench/serve_bench.py
	$(PY) bench/step_bench.py
	$(PY) bench/gen_bench.py
	$(PY) bench/kserve_bench.py
	$(PY) bench/series_bench.py
	$(PY) bench/isolation_bench.py
	$(PY) bench/security_bench.py
	$(PY) bench/store_bench.py
	$(PY) bench/scale_bench.py
	$(PY) bench/export_bench.py

# Regenerate the Python stubs from protos/ (tests/test_protos.py fails when they are stale).
protos: $(STAMP)
	$(PY) scripts/protogen.py

lint: $(STAMP)
	$(VENV)/bin/ruff check trainer server client tests bench scripts

clean-venv:
	rm -rf $(VENV)
