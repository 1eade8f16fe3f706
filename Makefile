# The two commands of the README:
#   make demo   - set up, then dry-run the bundled examples (the main job, on defaults)
#   make test   - set up, then lint, type-check and run the whole test suite (e2e included)
# Set-up is idempotent: a second run reuses .venv and the Go build cache.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test setup lint unit e2e bench controlplane tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@echo '### opt-in region ap-southeast-4: the default account 602401143452 gets 403'
	$(BIN)/ecr-webhook dry-run --region ap-southeast-4 -f examples/aws-node-ap-southeast-4.yaml
	@echo '### China partition: the commercial us-west-2 images cannot be pulled'
	$(BIN)/ecr-webhook dry-run --region cn-north-1 -f examples/cni-commercial-in-china.yaml
	@echo '### af-south-1: a pod running the pause image from the wrong account'
	$(BIN)/ecr-webhook dry-run --region af-south-1 -f examples/pause-pod-af-south-1.yaml
	@echo '### eu-central-1: images that already work stay untouched'
	$(BIN)/ecr-webhook dry-run --region eu-central-1 -f examples/untouched.yaml

controlplane:
	bash tests/e2e/build_controlplane.sh

tools:
	bash tools/build-kustomize.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# pytest exits 5 when it collects no test; make treats any non-zero as failure.
test: setup lint controlplane tools
	$(BIN)/pytest -p no:cacheprovider

unit: setup
	$(BIN)/pytest -p no:cacheprovider -m 'not e2e'

e2e: setup controlplane
	$(BIN)/pytest -p no:cacheprovider -m e2e

bench: setup
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/dryrun.py

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
