# Every target sets up what it needs on a fresh machine: the .venv, libaio, the package, the op.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.ds_fastckpt-installed
LIBAIO_PROBE := printf '\043include <libaio.h>\nint main(void){io_context_t c=0;return io_setup(1,&c);}\n' | cc -x c - -laio -o /dev/null

EXAMPLE_DIR ?= example_ckpts

.PHONY: test test-long example bench libaio strace clean

test: $(INSTALLED) strace
	$(PY) -m pytest tests

# The full-size reliability runs: 500 save+rotate cycles, 200 kills of one process, 40 of a 2-rank job.
test-long: $(INSTALLED) strace
	DS_FASTCKPT_ENDURANCE_CYCLES=500 DS_FASTCKPT_KILLS=200 DS_FASTCKPT_TWO_RANK_KILLS=40 $(PY) -m pytest tests/reliability

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
	$(PY) -m pip install -e ".[test]"
	$(PY) -c "from ds_fastckpt.native.op import load_op; load_op()"
	touch $@

clean:
	rm -rf build dist *.egg-info
