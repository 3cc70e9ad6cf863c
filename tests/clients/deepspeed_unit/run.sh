#!/usr/bin/env bash
# Runs DeepSpeed's own checkpoint unit tests twice, plain and with fast_aio injected into every
# DeepSpeed config (sitecustomize.py in this folder, put on PYTHONPATH), and compares the results.
#
#   tests/clients/deepspeed_unit/run.sh DEEPSPEED_SRC [TEST_PATH...]
#
# DEEPSPEED_SRC is a DeepSpeed source tree (one holding tests/unit/checkpoint; the PyPI wheel and
# sdist carry no tests), ideally of the version installed in .venv. TEST_PATHs, relative to
# DEEPSPEED_SRC/tests/unit/checkpoint (e.g. test_zero_optimizer.py test_latest_checkpoint.py or a
# node id), run a subset; without them the whole folder runs.
#
# Environment: WORKDIR (default: a new mktemp -d) keeps the logs, junit files and the injection
# log; OMP_NUM_THREADS defaults to 1 (the ranks of a test share the host's cores); PYTEST_EXTRA
# adds pytest options to both runs; PYTHONPATH is kept (e.g. a folder holding pytest<8.4, which
# DeepSpeed's DistributedFixture tests need); LOCAL_SIZE=N makes DeepSpeed's CPU accelerator report
# N devices, so the world_size 2 and 4 tests run instead of being skipped (slow on few cores).
# TORCH_EXTENSIONS_DIR defaults to a JIT-op cache of this checkout's own, so that other checkouts
# building ds_fastckpt_op with other paths do not force rebuilds under a shared lock mid-run; the
# ops both runs need are built into it before the runs (not timed).
#
# Exits 0 when both runs give the same passed/failed/skipped/error counts and the same outcome per
# test, and at least one config was injected; 1 otherwise; 2 on a usage error.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
if [ $# -lt 1 ] || [ ! -d "$1/tests/unit/checkpoint" ]; then
    echo "usage: $0 DEEPSPEED_SRC [TEST_PATH...]   (DEEPSPEED_SRC/tests/unit/checkpoint must exist)" >&2
    exit 2
fi
src="$(cd "$1" && pwd)"
shift
python="$repo/.venv/bin/python"
[ -x "$python" ] || { echo "no $python: run 'make test' first" >&2; exit 2; }

targets=()
if [ $# -eq 0 ]; then
    targets=("$src/tests/unit/checkpoint")
else
    for t in "$@"; do targets+=("$src/tests/unit/checkpoint/$t"); done
fi

workdir="${WORKDIR:-$(mktemp -d /tmp/ds-unit-compare.XXXXXX)}"
mkdir -p "$workdir"
inject_log="$workdir/injected.log"
: > "$inject_log"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
checkout_id="$(printf '%s' "$repo" | md5sum | cut -c1-12)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ds_fastckpt_deepspeed_unit/$checkout_id}"

# PYTHONPATH as the caller had it, without this folder (so the plain run is really plain).
base_pythonpath="$(printf '%s' "${PYTHONPATH:-}" | tr ':' '\n' | grep -vxF "$here" | grep -v '^$' | paste -sd: -)"

run_suite() {  # name pythonpath
    local name="$1" pp="$2" start end rc
    echo "== $name run: pytest ${targets[*]}"
    start=$(date +%s)
    (cd "$repo" && env PYTHONPATH="$pp" DS_ACCELERATOR=cpu DS_FASTCKPT_INJECT_LOG="$inject_log.$name" \
        "$python" -m pytest "${targets[@]}" -q -p no:cacheprovider -rfEs \
        --basetemp="$workdir/tmp-$name" --junitxml="$workdir/junit-$name.xml" ${PYTEST_EXTRA:-} \
        > "$workdir/pytest-$name.log" 2>&1)
    rc=$?
    end=$(date +%s)
    echo "$name: pytest exit $rc, wall $((end - start)) s, log $workdir/pytest-$name.log"
    echo "$((end - start))" > "$workdir/wall-$name"
    sed 's/\x1b\[[0-9;]*m//g' "$workdir/pytest-$name.log" | grep -E '^=+ .* in [0-9.]+s' | tail -1
}

echo "== building the JIT ops into $TORCH_EXTENSIONS_DIR (once per cache)"
(cd "$repo" && env DS_ACCELERATOR=cpu "$python" -c '
from deepspeed.accelerator import get_accelerator
from ds_fastckpt import FastCkptBuilder
for name in ("FusedAdamBuilder", "ShareMemCommBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
FastCkptBuilder().load(verbose=False)
' > "$workdir/build-ops.log" 2>&1) || { echo "building the ops failed: $workdir/build-ops.log" >&2; exit 1; }

: > "$inject_log.plain"
: > "$inject_log.injected"
run_suite plain "$base_pythonpath"
run_suite injected "$here${base_pythonpath:+:$base_pythonpath}"
cat "$inject_log.injected" > "$inject_log"

"$python" - "$workdir" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

workdir = Path(sys.argv[1])
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def summary(name):
    """pytest's own final counts: {'passed': n, 'failed': n, 'skipped': n, 'error': n, ...}."""
    lines = [ANSI.sub("", l) for l in (workdir / f"pytest-{name}.log").read_text(errors="replace").splitlines()]
    finals = [l for l in lines if re.match(r"^=+ .* in [0-9.]+s", l)]
    counts = Counter()
    if finals:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", finals[-1]):
            counts["error" if word.startswith("error") else word] += int(number)
    return counts, bool(finals)


def outcomes(name):
    path = workdir / f"junit-{name}.xml"
    result = {}
    if not path.exists():
        return result
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds else
                   "skipped" if "skipped" in kinds else "passed")
        result[test] = outcome
    return result


ok = True
keys = ("passed", "failed", "skipped", "error", "xfailed", "xpassed", "deselected")
counts = {}
for name in ("plain", "injected"):
    counts[name], finished = summary(name)
    shown = ", ".join(f"{counts[name][k]} {k}" for k in keys if counts[name][k]) or "nothing"
    print(f"{name:9s}: {shown}" + ("" if finished else "  (no final pytest summary: the run was cut short)"))
    ok &= finished
if any(counts["plain"][k] != counts["injected"][k] for k in keys):
    print("DIFFERENT counts")
    ok = False

plain, injected = outcomes("plain"), outcomes("injected")
differing = sorted(t for t in plain.keys() | injected.keys() if plain.get(t) != injected.get(t))
for test in differing:
    print(f"  {test}: plain {plain.get(test, 'absent')}, injected {injected.get(test, 'absent')}")
ok &= not differing

lines = (workdir / "injected.log").read_text().splitlines()
decisions = Counter(l.split()[0] for l in lines if l.strip())
leaked = [l for l in (workdir / "injected.log.plain").read_text().splitlines() if l.strip()]
print(f"configs injected: {decisions['injected']}, left alone: {decisions['left-alone']}"
      + (f", install failures: {decisions['install-failed']}" if decisions["install-failed"] else "")
      + f" (log {workdir / 'injected.log'})")
for reason, n in Counter(" ".join(l.split()[2:]) for l in lines if l.startswith("left-alone")).items():
    print(f"  left alone {n}x: {reason}")
if decisions["injected"] == 0 or decisions["install-failed"]:
    print("NO INJECTION: the injected run did not exercise fast_aio")
    ok = False
if leaked:
    print(f"the plain run injected {len(leaked)} configs: it was not plain")
    ok = False
print("SAME results" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF
