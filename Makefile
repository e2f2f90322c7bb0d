# elbo-lab: `make run` sets up .venv and trains the default VAE; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: run test lint format bench figures clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/elbo-lab train --force --run-dir runs/default

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	# the NumPyro peer: an optional extra (benchmarks/numpyro_vae.py skips cleanly without it)
	$(BIN)/pip install --quiet "numpyro==0.22.0" "jax==0.10.2"
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/evidence.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/reference_vae.py
	$(BIN)/python benchmarks/kill_loop.py
	$(BIN)/python benchmarks/watch_overhead.py
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/whole_run.py
	$(BIN)/python benchmarks/whole_run.py --steps 100 \
		--programs elbo-lab,elbo-lab@default,plain,plain@default,numpyro,numpyro@default
	$(BIN)/python benchmarks/run_parts.py
	$(BIN)/python benchmarks/step_parts.py
	$(BIN)/python benchmarks/step_parts.py --scale 784,400,20 --rows 60000 --calls 200
	$(BIN)/python benchmarks/gemm_rates.py
	$(BIN)/python benchmarks/whole_run.py --mnist-sized --epochs 2 --rounds 2 \
		--programs elbo-lab,plain,numpyro,plain@default,numpyro@default
	$(BIN)/python benchmarks/compiled_step.py
	$(BIN)/python benchmarks/compiled_step.py --scale 784,400,20

# The README's figures from default settings: train (curves, reconstructions, samples, latent),
# explain (bound), compare (comparison); copied to docs/.
FIGURES := curves reconstructions samples latent bound
figures: $(STAMP)
	$(BIN)/elbo-lab train --force --run-dir runs/figures --no-progress
	$(BIN)/elbo-lab explain runs/figures > runs/figures/explain.txt
	$(BIN)/elbo-lab compare --force --epochs 600 --run-dir runs/figures-compare > runs/figures-compare.txt
	mkdir -p docs
	cp $(FIGURES:%=runs/figures/%.png) runs/figures-compare/comparison.png docs/

clean:
	rm -rf $(VENV) runs .pytest_cache
