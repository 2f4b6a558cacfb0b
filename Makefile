VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint quickstart quickstart-grid tiny-clip bench clean prepare report slurm-up

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint:
	$(PY) -m ruff check src tests hydra_plugins

test: lint
	$(PY) -m pytest

bench:
	$(PY) experiments/benchmarks/bench.py $(BENCH_ARGS)

quickstart:
	$(PY) -m src.train experiment=quickstart

# Figure 3 in miniature (shots x seeds x contexts on digits), then its report and curves
quickstart-grid:
	$(PY) -m src.train -m experiment=quickstart_grid
	$(PY) -m src.report outputs/quickstart_grid

# Pre-trains the tiny CLIP of model=tiny_pretrained again (src/models/shipped/, a few minutes)
tiny-clip:
	$(PY) -m src.models.pretrain_tiny

# make prepare NAME=dtd DATA=/path/to/data: what is present in $(DATA)/<dataset folder>, what is missing
prepare:
	$(PY) -m src.data.prepare $(NAME) --data-dir $(or $(DATA),data)

# make report DIR=outputs/fewshot_grid: runs.csv, report.md (tables) and plots/ in DIR/report/
# (ARGS=--wandb: also as one W&B run)
report:
	$(PY) -m src.report $(or $(DIR),outputs) $(ARGS)

# A one-node SLURM cluster on this machine for the SLURM tests (as root: installs slurm-wlm, munge)
slurm-up:
	.ci/slurm_up.sh

clean:
	rm -rf outputs multirun .pytest_cache
