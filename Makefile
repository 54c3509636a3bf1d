# vidalign: `make demo` and `make test` create .venv on first use and install the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo pretrained test test-unit test-real test-gpu bench bench-gpu lint format clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,deepspeed]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vidalign demo --out runs/demo

# the demo's shipped generator and reward backbone, then the cascade's stages over that generator
# (align/demo_models/, fp16 + SHA256SUMS); ~15 + ~10 min on 2 cores
pretrained: $(STAMP)
	$(BIN)/vidalign pretrain recipes/tiny_sora_pretrain.yaml --demo align/demo_models
	$(BIN)/vidalign pretrain recipes/tiny_sora_cascade_pretrain.yaml --demo align/demo_models

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# headless Chromium + chromedriver for tests/test_annotate_browser.py (Debian packages, from the distro registry)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not gpu and not real"

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not gpu and not real"

# the published Wan 2.1 1.3B architecture (random bf16 weights) on CPU: a DPO step, a GRPO round, LoRA
# loaded by WanPipeline, the planner against a measured peak (~10 min on 2 cores, < 12 GB); glibc returns
# freed blocks over 128 KiB at once, so the resident set measures live memory (tests/test_plan.py)
test-real: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=131072 $(BIN)/python -m pytest -q -s -m real tests/real

# the real adapters on CUDA in bf16 (skipped without a GPU): peak memory and step times printed
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -s -m gpu tests/gpu

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.latent_cache
	$(BIN)/python -m bench.distributed
	$(BIN)/python -m bench.grpo
	$(BIN)/python -m bench.online_rl

# the real Wan 2.1 1.3B architecture (random bf16 weights) at 33x480x832 on one GPU (H100: < 8 min): DPO step,
# GRPO round, peak memory and MFU beside the planner's figures, in bench/gpu.json
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.gpu --out bench/gpu.json

lint: $(STAMP)
	$(BIN)/ruff format --check align reward_models tests bench
	$(BIN)/ruff check align reward_models tests bench

format: $(STAMP)
	$(BIN)/ruff format align reward_models tests bench
	$(BIN)/ruff check --fix align reward_models tests bench

clean:
	rm -rf runs .pytest_cache
