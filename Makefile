# The two commands a newcomer needs: `make train` and `make test`.
# Both first set up .venv (once): the CPU build of PyTorch, then farsync and its deps.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: train test install clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU wheel first: a bare `torch` requirement would pull several GB of CUDA packages
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# A real training run on the embedded corpus (the Python standard library's source).
train: $(BIN)/.installed
	$(BIN)/farsync train $(ARGS)

# Every test: unit, real multi-process gloo, end-to-end CLI runs.
test: $(BIN)/.installed
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
