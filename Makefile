# chatforge — `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
EXTRAS ?= train,serve,spell,test,llamacpp
STAMP := $(VENV)/.installed

.PHONY: install test demo clean llama-server

install: $(STAMP)

# Torch first (the CPU wheel; see README "Other machines"), then the project with constraints.txt so that no
# dependency can pull a different (multi-GB CUDA) torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	CMAKE_ARGS="-DLLAMA_CURL=OFF" $(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$(TORCH_VERSION)' else f'torch {torch.__version__} != $(TORCH_VERSION)')"
	touch $(STAMP)

# The llamacpp extra compiles llama-cpp-python (~8 min the first time; pip caches the wheel) and llama-server
# is built once from the same sources into ~/.cache/chatforge/llama.cpp/ (~5-10 min): the llama.cpp paths' tests
# run for real in `make test`.
test: install llama-server
	$(PY) -m pytest -q

llama-server: install
	$(PY) -m chatforge.models.llamacpp_build

# make demo PORT=8001 serves on 8001; without PORT, 8000 or a free port when 8000 is taken
demo: install
	$(PY) -m chatforge demo $(if $(PORT),--port $(PORT))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
