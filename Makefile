# One command sets up and runs the main job offline; one sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# plain pip takes torch/torchvision from this machine's disk; the stamp avoids reinstalling
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m cnncodes.demo

test: setup
	$(BIN)/python -m pytest -q

# figures of the README's performance section (tens of minutes on 2 cores; not part of CI)
bench: setup
	$(BIN)/python benchmarks/bench_extract.py --limit 1024
	$(BIN)/python benchmarks/bench_sweep.py --baseline-n 20000
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/soak.py --kills 50
	$(BIN)/python benchmarks/bench_ray.py --images 128
	$(BIN)/python benchmarks/bench_stream.py --rows 10000

clean:
	rm -rf artifacts/codes artifacts/runs artifacts/demo
