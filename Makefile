# Two commands: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medunic-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

# Real report text for `medunic pipeline --data public-text`: only torchxrayvision's data
# files are read (never imported), so it is installed without its dependencies.
PUBLIC_TEXT := torchxrayvision==1.5.7

.PHONY: setup public-text demo pipeline test test-slow bench wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)
	touch $(STAMP)

public-text: setup
	$(PY) -m pip install --quiet --no-deps $(PUBLIC_TEXT)

# The federation whose parity with centralized training is shown (README, "Parity on 1000
# fixed cases"): each site takes 5 rounds x 100 steps of 16 pairs, the same 16,000 pairs as
# centralized training's 500 steps of 32 and its sequential depth; reports mean-pooled.
demo: setup
	$(VENV)/bin/medunic simulate fed.local_steps=100 train.batch_size=16 model.text.pooling=mean

pipeline: public-text
	$(VENV)/bin/medunic pipeline

test: setup
	$(PY) -m pytest

test-slow: public-text
	$(PY) -m pytest -m slow --durations=20

# every wheel a site needs on this platform, hashed, with install-offline.sh (docs/deployment.md)
wheelhouse: setup
	bash scripts/wheelhouse.sh wheelhouse

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/federation_overhead.py

clean:
	rm -rf wheelhouse runs cache data/synthetic data/federated-* data/public-text-* wandb .pytest_cache .flwr .flwr-test
