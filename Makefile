# kvslimmer-vllm: the two commands of the README, and their parts.
#   make serve   set up, fetch the default model, serve it with KV merging on 127.0.0.1:8000
#   make test    set up, fetch the default model, run the whole test suite
#   make image-cpu image-cpu-check   build the CPU image (docker, or buildah without a
#                daemon) and check that it serves with KV merging (not part of CI)
VENV ?= .venv
export VENV

.PHONY: install model serve test eval bench-fidelity image-cpu image-cpu-check clean

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

# Container image (scripts/build_image.sh: IMAGE_TAG, ENGINE, BASE_IMAGE, WHEELS_DIR, ...)
image-cpu:
	scripts/build_image.sh cpu

# Runs the image, waits for /health, chats, and requires merge rounds on /metrics
image-cpu-check:
	scripts/check_image.sh $(or $(IMAGE_TAG),kvslimmer-vllm:cpu)

clean:
	rm -rf $(VENV) build *.egg-info results
