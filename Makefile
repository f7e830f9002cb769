# Two commands do all the set-up on a fresh clone:
#   make demo   virtual environment + install (once), tiny model + synthetic data, train under DeepSpeed
#   make test   the test suite (fast unit tests and CPU integration runs)
# Re-running either installs nothing again unless setup.cfg changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORK   ?= work
# torch 2.14.1 / torchvision 0.29.1 are the builds this machine carries; override on other machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
NUM_PROCS ?= 2
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast bench-cpu clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(WORK)/tiny-sd/model_index.json: | $(STAMP)
	$(BIN)/defect-ds make-tiny-model $(WORK)/tiny-sd

$(WORK)/data/synthetic/manifest.json: | $(STAMP)
	$(BIN)/defect-ds prepare synthetic $(WORK)/data/synthetic --resolution-px 64

demo: $(STAMP) $(WORK)/tiny-sd/model_index.json $(WORK)/data/synthetic/manifest.json
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus $(NUM_PROCS) train.py --config configs/default.toml \
	  --checkpoint.resume=latest
	@echo "exports: runs/default/export   samples: runs/default/samples   logs: runs/default/metrics.jsonl"

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow"

clean-demo:
	rm -rf runs/default
