"""Engine-level checks in hostile save_dirs: resume, then save, each scenario in a forked child with time limits.

    python tests/engine/hostile_worker.py SCENARIOS_JSON RESULTS_JSONL INIT_TIMEOUT_S STEP_TIMEOUT_S

SCENARIOS_JSON holds a list of ``{"name", "save_dir", "fast_aio", "saves"}``. For each, a child forked from
this process (which imports DeepSpeed once and never starts torch.distributed) starts a fast_aio engine,
calls ``load_checkpoint(save_dir)``, then saves ``saves`` times (``global_step3``, ``global_step4``, ...,
training up to that step first, also when the load failed). Every step appends a JSON line to
RESULTS_JSONL when it ends: ``{"scenario", "step", "error_type", "error", "loaded", "log_chars", "logs",
"seconds"}``. A step that does not end within STEP_TIMEOUT_S (the engine start: INIT_TIMEOUT_S), or a
child that dies, gets a line with ``"error_type": "timeout"`` (or ``"died"``) and the child is killed.
Once its engine has started, a child may grow by 1 GiB of address space at most, so reading /dev/zero
fails instead of swapping.
"""

import json
import logging
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402,F401  (imported once here; the children inherit it)

import ds_fastckpt  # noqa: E402,F401
from ds_fastckpt.native.op import load_op  # noqa: E402
from tests.ds_helpers import free_port, init_engine, single_process_env, train  # noqa: E402

_KEEP_CHARS = 4000
_SMALL_BUCKETS = {"stage": 1, "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _report(results: Path, scenario: str, step: str, started: float, collect: _Collect, error=None,
            loaded=None) -> None:
    line = {"scenario": scenario, "step": step, "error_type": type(error).__name__ if error else None,
            "error": str(error)[:_KEEP_CHARS] if error else "", "error_chars": len(str(error)) if error else 0,
            "loaded": loaded, "log_chars": sum(len(message) for message in collect.messages),
            "logs": [message[:_KEEP_CHARS] for message in collect.messages], "seconds": time.monotonic() - started}
    collect.messages.clear()
    with open(results, "a") as file:
        file.write(json.dumps(line) + "\n")


def _run(scenario: dict, results: Path) -> None:
    os.environ["MASTER_PORT"] = str(free_port())
    single_process_env()
    collect = _Collect()
    logging.getLogger("ds_fastckpt").addHandler(collect)
    logging.getLogger("ds_fastckpt").setLevel(logging.INFO)
    name, save_dir = scenario["name"], scenario["save_dir"]
    started = time.monotonic()
    # Small ZeRO buckets: the default ones reserve 2 GB of address space, more than the cap allows.
    engine = init_engine(1, scenario["fast_aio"], seed=9, zero_optimization=_SMALL_BUCKETS)
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))
    _report(results, name, "init", started, collect)
    started = time.monotonic()
    try:
        path, _ = engine.load_checkpoint(save_dir)
        _report(results, name, "load", started, collect, loaded=None if path is None else Path(path).parent.name)
    except Exception as error:  # reported; the parent test asserts on it
        _report(results, name, "load", started, collect, error=error)
    for index in range(scenario["saves"]):
        train(engine, max(1, 3 + index - engine.global_steps))  # global_step3, 4, ... also when the load failed
        started = time.monotonic()
        try:
            engine.save_checkpoint(save_dir)
            _report(results, name, f"save{index + 1}", started, collect)
        except Exception as error:  # reported; the parent test asserts on it
            _report(results, name, f"save{index + 1}", started, collect, error=error)
    engine.destroy()


def _lines(results: Path) -> list:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines()]


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    results, init_timeout, step_timeout = Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    load_op()
    context = multiprocessing.get_context("fork")
    for scenario in scenarios:
        steps = ["init", "load", *[f"save{index + 1}" for index in range(scenario["saves"])]]
        child = context.Process(target=_run, args=(scenario, results))
        child.start()
        started_with = last_count = len(_lines(results))
        last_progress = time.monotonic()
        while child.is_alive():
            child.join(0.2)
            count = len(_lines(results))
            if count != last_count:
                last_count, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > (step_timeout if count > started_with else init_timeout):
                child.kill()
                child.join()
                break
        done = {line["step"] for line in _lines(results) if line["scenario"] == scenario["name"]}
        missing = [step for step in steps if step not in done]
        if missing:
            kind = "timeout" if child.exitcode == -9 else "died"
            with open(results, "a") as file:
                file.write(json.dumps({"scenario": scenario["name"], "step": missing[0], "error_type": kind,
                                       "error": f"exit code {child.exitcode}", "logs": [], "log_chars": 0}) + "\n")


if __name__ == "__main__":
    main()
