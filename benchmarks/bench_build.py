"""Cold JIT build time of the native op: a fresh TORCH_EXTENSIONS_DIR, one build, in a child process.

With ``--rounds N`` the cold build runs N times (``ds_fastckpt.cli.measure.interleaved``, one method)
and the median is printed.

    python benchmarks/bench_build.py [--rounds N]
"""

import argparse
import os
import subprocess
import sys
import tempfile

from ds_fastckpt.cli.measure import interleaved, medians, timed

BUILD = "from ds_fastckpt.native.op_builder import FastCkptBuilder; FastCkptBuilder().jit_load(verbose=False)"
METHOD = "cold JIT build"


def cold_build(_round_index: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_build_") as cache:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache)
        return timed(lambda: subprocess.run([sys.executable, "-c", BUILD], check=True, env=env))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="cold builds to take the median of (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is not allowed: use 1 or more")

    seconds = medians(interleaved({METHOD: cold_build}, args.rounds))[METHOD]
    rounds = "" if args.rounds == 1 else f", median of {args.rounds}"
    print(f"cold JIT build of the ds_fastckpt op (process start included{rounds}): {seconds:.1f} s")


if __name__ == "__main__":
    main()
