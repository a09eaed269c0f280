# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench-demo bench-reference bench-quality bench-posttrain bench-speed bench-memory bench-scale clean-venv

$(VENV)/.core: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.core requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

demo: $(VENV)/.core
	$(PY) run_pipeline.py $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest -p no:cacheprovider -q --doctest-modules data models losses pipeline tests

# The README's demo table: the demo, its contrastive-only variant and the demo without posttrain, in a fresh folder.
bench-demo: $(VENV)/.core
	$(PY) benchmarks/demo_table.py $(ARGS)

bench-reference: $(VENV)/.bench
	$(PY) benchmarks/reference_scifact.py

# SciFact quality, every row in one run: --config gpu on a CUDA machine (default there), cpu elsewhere.
bench-quality: $(VENV)/.bench
	$(PY) benchmarks/quality_scifact.py $(ARGS)

# SciFact post-training (MLM, SimCSE, Mirror-BERT) and pooling rows at CPU budget (planned ~70 minutes on 2 cores; not yet run at full size).
bench-posttrain: $(VENV)/.bench
	$(PY) benchmarks/posttrain_scifact.py $(ARGS)

# Speed against sentence-transformers: --config gpu on a CUDA machine (default there), cpu elsewhere.
bench-speed: $(VENV)/.bench
	$(PY) benchmarks/speed.py $(ARGS)

# Peak memory of the distill step, plain against cached (distill.memory.mini_batch), one process per measurement.
bench-memory: $(VENV)/.bench
	$(PY) benchmarks/memory.py $(ARGS)

# The data path at 10k / 100k / 1M generated passages: time and peak RSS of each step, one process per step.
bench-scale: $(VENV)/.bench
	$(PY) benchmarks/scale.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
