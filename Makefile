# The two user-facing commands are `make demo` and `make test`; each sets up everything it needs first
# (a virtual environment in .venv with the pinned packages; Debian's ffmpeg where we are root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test gpu-check

$(STAMP): pyproject.toml
	@if ! command -v ffmpeg >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian ffmpeg (shared libraries for torchcodec, CLI for benchmarks)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; \
	  else echo "note: no system ffmpeg and not root: decoding uses PyAV (bundled FFmpeg)"; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The embedded demo: synthetic videos -> shards -> a model trained from scratch on 2 CPU processes: the divided
# space-time TimeSformer (configs/demo.yaml), or with MODEL=r3d_18_transformer | r2plus1d_18_transformer |
# resnet18_temporal the CNN families (configs/demo_$(MODEL).yaml).
# Each step reuses what is already there (generated videos, packed shards, the run's latest checkpoint); shards
# packed by an earlier version with other settings are re-packed (--repack; the packer says what changed).
DEMO_VIDEOS := data/videos/synth
DEMO_SHARDS := data/shards/synth
DEMO_CONFIG := configs/$(if $(MODEL),demo_$(MODEL),demo).yaml

demo: $(STAMP)
	@test -f $(DEMO_CONFIG) || { echo "error: no $(DEMO_CONFIG): MODEL is one of r3d_18_transformer, r2plus1d_18_transformer, resnet18_temporal (or unset for the TimeSformer)"; exit 2; }
	@test -f $(DEMO_VIDEOS)/.complete || { $(PY) shards/synthetic.py --out $(DEMO_VIDEOS) && touch $(DEMO_VIDEOS)/.complete; }
	$(PY) shards/pack.py $(DEMO_VIDEOS) --out $(DEMO_SHARDS) --repack
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train.py --config $(DEMO_CONFIG)

# The GPU check (docs/gpu.md) on a CUDA machine, with that machine's own PyTorch (no venv, no network): installs
# the wheels benchmarks/gpu_wheels.py put in .whl/ into a scratch folder, proves the GPU paths, measures speed,
# and writes results.json + table.md into GPU_CHECK_OUT. About 6 minutes on an H100.
GPU_PY ?= python3
GPU_CHECK_OUT ?= benchmarks/out/gpu_check

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(if $(wildcard .whl/*.whl),--wheels .whl) --out $(GPU_CHECK_OUT)
