# `make train`, `make test` and `make demo` set up .venv (once, re-done when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test train demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

# The main job: train on the built-in synthetic dataset (about 2.5 minutes on 2 CPU cores); each run gets
# its own runs/fcn-DATE-TIME folder, so earlier runs are never overwritten.
train: setup
	$(VENV)/bin/fcn-jax train --run-dir runs/fcn-$$(date +%Y%m%d-%H%M%S)

# Convert a random PyTorch FCN8s-VGG16 and verify that JAX and PyTorch give the same logits.
demo: setup
	mkdir -p runs/demo
	$(PY) -c "import torch; from fcn_jax.reference import build_torch_model; \
	torch.save(build_torch_model('fcn8s', 21, 'vgg16').state_dict(), 'runs/demo/fcn8s_vgg16.pth')"
	$(VENV)/bin/fcn-jax convert --input runs/demo/fcn8s_vgg16.pth --arch fcn8s \
	  --output runs/demo/fcn8s_vgg16.safetensors --verify

clean:
	rm -rf $(VENV) runs .pytest_cache
