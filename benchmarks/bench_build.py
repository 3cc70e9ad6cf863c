"""Cold JIT build time of the native op: a fresh TORCH_EXTENSIONS_DIR, one build, in a child process.

    python benchmarks/bench_build.py
"""

import os
import subprocess
import sys
import tempfile
import time

BUILD = "from ds_fastckpt.native.op_builder import FastCkptBuilder; FastCkptBuilder().jit_load(verbose=False)"


def main():
    with tempfile.TemporaryDirectory(prefix="bench_build_") as cache:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD], check=True, env=env)
        elapsed = time.perf_counter() - start
    print(f"cold JIT build of the ds_fastckpt op (process start included): {elapsed:.1f} s")


if __name__ == "__main__":
    main()
