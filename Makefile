# Every target sets up what it needs on a fresh machine: the .venv, libaio, the package, the op.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.ds_fastckpt-installed
LIBAIO_PROBE := printf '\043include <libaio.h>\nint main(void){io_context_t c=0;return io_setup(1,&c);}\n' | cc -x c - -laio -o /dev/null

EXAMPLE_DIR ?= example_ckpts

.PHONY: test test-long test-compat example bench libaio strace clean

test: $(INSTALLED) strace
	$(PY) -m pytest tests

# The full-size reliability runs: 500 save+rotate cycles, 200 kills of one process, 40 of a 2-rank job.
test-long: $(INSTALLED) strace
	DS_FASTCKPT_ENDURANCE_CYCLES=500 DS_FASTCKPT_KILLS=200 DS_FASTCKPT_TWO_RANK_KILLS=40 $(PY) -m pytest tests/reliability

# The DeepSpeed releases test-compat covers, at the edges of what install_requires allows (ds_fastckpt/compat.py):
# the oldest, the last before the releases it excludes, the first after them, the last 0.18 that trains on 2 ranks
# with torch 2.13 (0.18.7 to 0.18.9 fail there without ds_fastckpt too), the one we develop with.
COMPAT_DEEPSPEED ?= 0.17.1 0.17.5 0.18.3 0.18.6 0.19.8
COMPAT_DIR ?= build/compat
COMPAT_TESTS ?= tests/unit/test_compat.py tests/unit/test_registration.py tests/engine/test_round_trip.py \
  tests/engine/test_two_ranks.py tests/engine/test_async.py tests/engine/test_parallel_writers.py
COMPAT_VENV = $(COMPAT_DIR)/deepspeed-$*

# COMPAT_TESTS against each release in COMPAT_DEEPSPEED, each in its own venv under COMPAT_DIR with torch==2.13.0
# and its own JIT build of the op (4-15 minutes a release on the 2-core dev machine). Not part of `make test`. One:
# `make test-compat COMPAT_DEEPSPEED=0.17.1`; the venvs stay for the next run, `make clean` removes them.
test-compat: $(COMPAT_DEEPSPEED:%=test-compat-%)

test-compat-%: $(COMPAT_DIR)/deepspeed-%/.installed
	$(COMPAT_VENV)/bin/python -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)"
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(COMPAT_VENV)/torch_extensions $(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider $(COMPAT_TESTS)

# Built from scratch whenever setup.py changes; --no-build-isolation: DeepSpeed's setup.py wants the torch installed.
.PRECIOUS: $(COMPAT_DIR)/deepspeed-%/.installed
$(COMPAT_DIR)/deepspeed-%/.installed: setup.py | libaio
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install torch==2.13.0 setuptools wheel
	$(COMPAT_VENV)/bin/python -m pip install --no-build-isolation "deepspeed==$*"
	$(COMPAT_VENV)/bin/python -m pip install -e ".[test]" "deepspeed==$*"
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(COMPAT_VENV)/torch_extensions $(COMPAT_VENV)/bin/python -c \
	  "from ds_fastckpt.native.op import load_op; load_op()"
	touch $@

# Trains on 2 CPU ranks with torchrun, saving through fast_aio; run it again to see it resume.
example: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 examples/train.py --save-dir $(EXAMPLE_DIR) --compare-default

# Write throughput of BENCH_DIR's disk (default: the checkout's), a 1 GiB state dict, 5 interleaved rounds: the raw
# O_DIRECT ceiling, AioFileWriter and torch.save+fsync each with torch's zip CRC32 off and on, and DCP save.
bench: BENCH_DIR ?= .
bench: $(INSTALLED)
	$(PY) -m ds_fastckpt bench --dir $(BENCH_DIR) --size 1GiB --rounds 5 --crc32-both

# libaio's headers and library: installed with apt when we are root, else a clear stop.
libaio:
	@if ! $(LIBAIO_PROBE) 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev; \
	  else \
	    echo "libaio is missing: install Debian/Ubuntu 'libaio-dev' or Fedora/RHEL 'libaio-devel' as root, then rerun make" >&2; \
	    exit 1; \
	  fi; \
	fi

# strace, for tests/reliability/test_syscall_order.py: installed with apt when we are root, else that test skips.
# After libaio, so that `make -j` never runs two apt-gets at once.
strace: | libaio
	@if ! command -v strace >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; \
	fi

# torch==2.13.0 is only installed when the venv has no torch: a torch the user chose is kept.
$(INSTALLED): setup.py | libaio
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,s3]"
	$(PY) -c "from ds_fastckpt.native.op import load_op; load_op()"
	touch $@

clean:
	rm -rf build dist *.egg-info
