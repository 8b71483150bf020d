# chatforge — `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
EXTRAS ?= train,serve,spell,test
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# Torch first (the CPU wheel; see README "Other machines"), then the project with constraints.txt so that no
# dependency can pull a different (multi-GB CUDA) torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$(TORCH_VERSION)' else f'torch {torch.__version__} != $(TORCH_VERSION)')"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# make demo PORT=8001 serves on 8001; without PORT, 8000 or a free port when 8000 is taken
demo: install
	$(PY) -m chatforge demo $(if $(PORT),--port $(PORT))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
