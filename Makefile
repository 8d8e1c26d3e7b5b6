# The two commands of the README:
#   make demo   set up .venv (if missing) and run the main job on the embedded data
#   make test   set up .venv (if missing) and run the test suite
# Override the torch install for other machines, e.g. make test TORCH="torch torchvision".
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.extension-built
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu) setup.py pyproject.toml
DEMO_OUT ?= runs/demo

.PHONY: demo test venv bench results clean

venv: $(BUILT)

$(DEPS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "setuptools>=70" wheel ninja pybind11
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH)
	$(BIN)/pip install --disable-pip-version-check -q numpy click tqdm matplotlib scikit-learn scipy \
		pytest hypothesis captum timm himalaya mlxtend
	touch $@

# Builds shortcut_fast._C (C++, plus CUDA when a matching toolkit is found).
$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

# The headline experiment on the embedded synthetic data (B1 most distinctive), sized for a
# 2-core CPU: a narrow ResNet-18, 4x4 spectrum patches, 32 images per class.
demo: $(BUILT)
	$(BIN)/shortcut-fast info
	$(BIN)/shortcut-fast freq-probe --data synthetic-freq --bias-band 1 --patch 4 --max-images-per-class 32 \
		--ood gaussian-noise:3 --out $(DEMO_OUT)/freq-probe --overwrite

test: $(BUILT)
	SHORTCUT_FAST_EXPECT_EXT=1 $(BIN)/python -m pytest -q

# Reruns every command behind the rendered tables of README.md and docs/ (docs/results.py;
# about 1 h 20 min on a 2-core CPU, the real-digit DeNetDM table 21 min of it;
# `$(BIN)/python docs/results.py run --all` adds the long full-width training rows and the full
# Colored MNIST, which needs the MNIST idx files under $$SHORTCUT_FAST_DATA), writes
# docs/results/*.json and docs/figures/, then rewrites the tables in README.md and docs/ from them.
results: $(BUILT)
	$(BIN)/python docs/results.py run
	$(BIN)/python docs/results.py render

bench: $(BUILT)
	$(BIN)/shortcut-fast bench --device $${DEVICE:-cpu}

clean:
	rm -rf build *.egg-info shortcut_fast/_C*.so $(VENV)
