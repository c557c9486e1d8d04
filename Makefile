# Two commands for a newcomer: `make demo` and `make test`. Both install first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := packages/xmsda/pyproject.toml packages/chorus/pyproject.toml

.PHONY: install demo test test-fast lint format clean

$(STAMP): $(PACKAGES) constraints.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: `torch==2.13.0` resolves to the CPU build on these machines;
	# any unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e 'packages/xmsda[transformers]' -e 'packages/chorus[cluster]' -r requirements-dev.txt
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/chorus demo --out out/demo.png

# The suite runs on two worker processes (pytest-xdist), each test file in one of them: most of its time is
# single-threaded (numba compiling the kernels, servers starting). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The quick tier for the edit-run loop: everything but the tests marked `slow`.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check packages tests
	$(BIN)/ruff format --check packages tests

format: $(STAMP)
	$(BIN)/ruff check --fix packages tests && $(BIN)/ruff format packages tests

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
