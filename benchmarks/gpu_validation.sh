#!/usr/bin/env bash
# One-shot validation on a CUDA machine, run from the repo root as ONE command:
#
#   bash benchmarks/gpu_validation.sh
#
# Steps, each under its own timeout, each run even when an earlier one failed (at most ~9.3 min, expected ~7):
#   env        the environment as the Makefile's .venv/.ds_fastckpt-installed makes it, keeping the machine's
#              CUDA torch (the Makefile installs torch only into a venv that has none), and the op built;
#   tests_gpu  pytest tests/gpu -q -rs;
#   tests_op   pytest tests/op -q -rs;
#   bench      python benchmarks/bench_gpu.py --sizes 1GiB,8GiB --rounds 3.
# DeepSpeed's async_io and utils ops (for the bench's FastCheckpointEngine row) are JIT-built in the background
# while the tests run (ds_ops.log). Logs and summary.txt go to $OUT if set, else ./gpu_validation_out.
#
# A machine that cannot reach a package registry needs what the Makefile would download, carried in
# dist/gpu_carry/ (dist/ is git-ignored): prepare it on a machine with the registries, from the repo root, with
#
#   bash benchmarks/gpu_validation.sh --prepare      # needs .venv (make .venv/.ds_fastckpt-installed) and apt
#
# then copy dist/gpu_carry into the CUDA machine's checkout along with it. With it, the env step installs those
# wheels with pip --no-index and, where libaio's headers are missing, unpacks the carried libaio .debs under /tmp
# instead of apt-get. Set GPU_PYTHON_VERSION (default 3.12) to the CUDA machine's python3 version when preparing.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
SCRIPT="$ROOT/benchmarks/gpu_validation.sh"
PY="$ROOT/.venv/bin/python"
CARRY="$ROOT/dist/gpu_carry"
# Run-time packages the CUDA image lacks (DeepSpeed and its pydantic), at the versions of this checkout's .venv.
CARRIED_WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
OPTIONAL_PACKAGES=(google-crc32c)  # tests/op's cross-check; skipped without it

libaio_links() {
  printf '#include <libaio.h>\nint main(void){io_context_t c=0;return io_setup(1,&c);}\n' |
    cc -x c - -laio -o /dev/null 2>/dev/null
}

pinned() {  # pinned NAME...: NAME==VERSION as installed in this checkout's .venv
  "$PY" -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "$@"
}

prepare() {
  local dependency
  [ -x "$PY" ] || { echo "prepare needs this checkout's .venv: run make .venv/.ds_fastckpt-installed" >&2; return 1; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/debs" || return 1
  # DeepSpeed is published as a source archive only: build its pure-Python wheel here (its ops are JIT-built there).
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheels" $(pinned deepspeed) || return 1
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
    $(pinned "${CARRIED_WHEELS[@]}" "${OPTIONAL_PACKAGES[@]}") || return 1
  apt-get update -qq || return 1
  dependency=$(apt-cache show libaio-dev | sed -n 's/^Depends: \(libaio1[a-z0-9]*\).*/\1/p' | head -n 1)
  (cd "$CARRY/debs" && apt-get download -qq libaio-dev "${dependency:-libaio1}") || return 1
  ls -l "$CARRY/wheels" "$CARRY/debs"
  du -sh "$CARRY"
}

# The carried libaio, unpacked under /tmp, for the compiler (CPATH, LIBRARY_PATH) and the loader (LD_LIBRARY_PATH).
use_carried_libaio() {
  local root=/tmp/ds_fastckpt_libaio deb lib
  libaio_links && { echo "libaio: the system's"; return 0; }
  if ! ls "$CARRY"/debs/*.deb >/dev/null 2>&1; then
    echo "libaio: headers or library missing and none carried; the env step tries apt-get (make libaio)"
    return 0
  fi
  mkdir -p "$root"
  for deb in "$CARRY"/debs/*.deb; do dpkg -x "$deb" "$root" || return 1; done
  lib=$(dirname "$(find "$root" -name 'libaio.so' | head -n 1)")
  export CPATH="$root/usr/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if libaio_links; then echo "libaio: carried, unpacked in $root"; else echo "libaio: the carried one does not link"; fi
}

# The env step: a .venv that sees the machine's CUDA torch, the package, its op built.
install() {
  if [ ! -x "$PY" ]; then
    if [ -e "$ROOT/.venv" ] || [ -L "$ROOT/.venv" ]; then mv "$ROOT/.venv" "$ROOT/.venv.broken.$$" || return 1; fi
    if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
      # python3 is itself a venv (the CUDA image's, holding torch): use it as .venv, so its torch is kept.
      ln -sfn "$(python3 -c 'import sys; print(sys.prefix)')" "$ROOT/.venv" || return 1
    else
      python3 -m venv --system-site-packages "$ROOT/.venv" || return 1
    fi
  fi
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available())' || return 1
  if [ -d "$CARRY/wheels" ]; then
    echo "offline install from $CARRY"
    # --no-deps: without a registry pip cannot settle the image's own requirements (torch's), only install these.
    "$PY" -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" deepspeed "${CARRIED_WHEELS[@]}" ||
      return 1
    "$PY" -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" "${OPTIONAL_PACKAGES[@]}" ||
      echo "optional packages not installed: ${OPTIONAL_PACKAGES[*]}"
    "$PY" -c "import deepspeed, pydantic; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)" ||
      return 1
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" ||
      echo "editable install failed: the steps import ds_fastckpt through PYTHONPATH"
    "$PY" -c "from ds_fastckpt.native.op import load_op; load_op()" || return 1
    touch "$ROOT/.venv/.ds_fastckpt-installed"
  else
    make .venv/.ds_fastckpt-installed
  fi
}

build_deepspeed_ops() {
  local cuda_home
  cuda_home=$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)
  if [ -n "$cuda_home" ] && [ -e "$cuda_home/lib64/stubs/libcuda.so" ]; then
    # async_io links -lcuda; a container often has only the driver's libcuda.so.1: link against the toolkit's stub.
    export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$cuda_home/lib64/stubs"
  fi
  "$PY" -c "from deepspeed.ops.op_builder import AsyncIOBuilder, UtilsBuilder
AsyncIOBuilder().load(verbose=False)
UtilsBuilder().load(verbose=False)
print('DeepSpeed async_io and utils ops built')"
}

# A JIT build killed by a step's timeout leaves its lock file, and the next load of that op waits on it forever.
# Called only while no build runs.
clear_stale_build_locks() {
  local dir="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
  [ -d "$dir" ] && find "$dir" -maxdepth 3 -name lock -type f -print -delete
  return 0
}

system_report() {
  date -u
  nproc
  free -g
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  df -h "$ROOT" /tmp /var/tmp
  stat -f -c '%n: %T' "$ROOT" /tmp /var/tmp
  command -v python3 cc make nvcc || true
}

case "${1:-}" in
  --prepare) prepare; exit $? ;;
  --install) install; exit $? ;;
  --deepspeed-ops) build_deepspeed_ops; exit $? ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_validation.sh [--prepare]" >&2; exit 2 ;;
esac

OUT_DIR="${OUT:-$ROOT/gpu_validation_out}"
mkdir -p "$OUT_DIR" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A world of one on this host: gloo and NCCL need no other interface than the loopback.
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
# pytest's tmp dirs on a disk filesystem (tests/op skips its O_DIRECT checks on tmpfs), outside the checkout
# (a test copies the checkout).
TMP_BASE=/var/tmp/ds_fastckpt_gpu_validation
mkdir -p "$TMP_BASE"

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout, output to the terminal and $OUT_DIR/NAME.log.
step() {
  local name=$1 limit=$2 start=$SECONDS rc verdict
  shift 2
  echo "=== $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMED OUT"; FAILED=1 ;;
    *) verdict=FAILED; FAILED=1 ;;
  esac
  printf '%-10s %-9s rc=%-3s %4ss\n' "$name" "$verdict" "$rc" "$((SECONDS - start))" | tee -a "$SUMMARY"
}

system_report >"$OUT_DIR/system.txt" 2>&1
use_carried_libaio >"$TMP_BASE/libaio.txt" 2>&1  # not in a pipeline: its exports must reach every step
tee -a "$SUMMARY" <"$TMP_BASE/libaio.txt"

step env 120 bash "$SCRIPT" --install
clear_stale_build_locks
timeout -k 5 180 bash "$SCRIPT" --deepspeed-ops >"$OUT_DIR/ds_ops.log" 2>&1 &
DS_OPS_PID=$!
step tests_gpu 90 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --basetemp "$TMP_BASE/gpu"
step tests_op 130 "$PY" -m pytest tests/op -q -rs -p no:cacheprovider --basetemp "$TMP_BASE/op"
wait "$DS_OPS_PID"
DS_OPS_RC=$?
echo "deepspeed ops build: rc=$DS_OPS_RC (ds_ops.log)" | tee -a "$SUMMARY"
clear_stale_build_locks
BENCH_OPTIONS=()
[ "$DS_OPS_RC" = 0 ] ||
  BENCH_OPTIONS=(--skip-fce "DeepSpeed's async_io/utils ops did not build here (rc=$DS_OPS_RC, ds_ops.log)")
step bench 210 "$PY" benchmarks/bench_gpu.py --sizes 1GiB,8GiB --rounds 3 --time-limit 160 "${BENCH_OPTIONS[@]}"

echo "=== summary (logs in $OUT_DIR)"
cat "$SUMMARY"
exit "$FAILED"
