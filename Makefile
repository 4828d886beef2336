# kvslimmer-vllm: the two commands of the README, and their parts.
#   make serve   set up, fetch the default model, serve it with KV merging on 127.0.0.1:8000
#   make test    set up, fetch the default model, run the whole test suite
VENV ?= .venv
export VENV

.PHONY: install model serve test eval bench-fidelity clean

install:
	scripts/install.sh

model: install
	$(VENV)/bin/kvslimmer-vllm fetch-model

serve: install
	scripts/serve.sh

test: model
	$(VENV)/bin/pytest tests

# Quality of every method vs full KV (EVAL_ARGS: e.g. --quick, --server URL, --lengths ...)
eval: model
	$(VENV)/bin/kvslimmer-vllm eval --out results/eval $(EVAL_ARGS)

bench-fidelity: model
	$(VENV)/bin/python benchmarks/merge_fidelity.py

clean:
	rm -rf $(VENV) build *.egg-info results
