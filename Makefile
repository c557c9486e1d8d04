# Two commands for a newcomer: `make demo` and `make test`. Both install first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: `torch==2.13.0` resolves to the CPU build on these machines;
	# any unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/chorus generate "a red circle moving left on a white background" --seed 0 --out out/demo.mp4

# The suite runs on two worker processes (pytest-xdist), each test file in one of them: most of its time is
# single-threaded (numba compiling the kernels, subprocesses starting): on a clean clone on 2 cores, 511 s of
# pytest in one process, 241-298 s on two workers. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint:
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

format:
	$(BIN)/ruff check --fix src tests && $(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
