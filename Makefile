# Every target sets up .venv as far as it needs (re-done when pyproject.toml or constraints.txt change):
# `make train` installs the core package only (no PyTorch); the test, lint and demo targets add the torch,
# onnx, coco and dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup setup-dev train test test-fast test-exhaustive lint demo clean

setup: $(VENV)/.core
setup-dev: $(VENV)/.dev

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP_INSTALL) -e ".[torch,onnx,coco,dev]"
	touch $@

# The main job: train on the built-in synthetic dataset (about 2 minutes on 2 CPU cores); each run gets
# its own runs/fcn-DATE-TIME folder, so earlier runs are never overwritten.
train: $(VENV)/.core
	$(VENV)/bin/fcn-jax train --run-dir runs/fcn-$$(date +%Y%m%d-%H%M%S)

# What CI runs: the linter, then the suite but the exhaustive matrices, on two worker processes (pytest-xdist;
# most of a test's time is single-threaded XLA compilation, so two workers overlap well on two cores).
# --dist loadgroup: the tests that share an expensive module fixture (a trained run) carry
# xdist_group("<fixture>") and run on one worker, so the fixture is made once, not once per worker.
XDIST := -n 2 --dist loadgroup
test: lint
	$(PY) -m pytest -q $(XDIST) -m "not exhaustive"

# The quick tier: everything but the tests marked slow or exhaustive.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q $(XDIST) -m "not slow and not exhaustive"

# The full matrices (every arch x depth x BatchNorm, the ConvTranspose grid, every paper head x depth, FCN-ResNet101)
# and the multi-process twins of in-process proofs (stop/kill/resume through real processes, two hosts, every
# command on FCN-ResNet-50): on demand, before a release.
test-exhaustive: $(VENV)/.dev
	$(PY) -m pytest -q $(XDIST) -m exhaustive

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

# Convert a random PyTorch FCN8s-VGG16 and verify that JAX and PyTorch give the same logits.
demo: $(VENV)/.dev
	mkdir -p runs/demo
	$(PY) -c "import torch; from fcn_jax.pytorch.reference import build_torch_model; \
	torch.save(build_torch_model('fcn8s', 21, 'vgg16').state_dict(), 'runs/demo/fcn8s_vgg16.pth')"
	$(VENV)/bin/fcn-jax convert --input runs/demo/fcn8s_vgg16.pth --arch fcn8s \
	  --output runs/demo/fcn8s_vgg16.safetensors --verify

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
