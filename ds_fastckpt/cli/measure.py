"""Interleaved timing for ``ds-fastckpt bench`` and the scripts in benchmarks/.

Every method runs once per round, and the order rotates by one place each round, so each method takes
each position equally often. Measured side by side in one process, the methods share whatever the
machine drifts through (page cache, other load, a disk's background work), and the medians and ratios
of one run compare like with like. Ratios are always taken against a baseline measured in the same run.

Call order: ``interleaved(methods, rounds)`` -> ``medians(samples)`` -> ``ratios(values, baseline)``;
``timed`` and ``format_ratio`` are for the methods and the printout.
"""

import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

Sample = Union[float, Sequence[float]]


def rotation(names: Sequence[str], round_index: int) -> List[str]:
    """The order of ``names`` in round ``round_index``: round 0 as given, each later round shifted by one.

    Args:
        names: the methods, in the order of round 0.
        round_index: 0-based round number.

    Returns:
        ``names[k:] + names[:k]`` with ``k = round_index % len(names)``.
    """
    shift = round_index % len(names) if names else 0
    return list(names[shift:]) + list(names[:shift])


def interleaved(methods: Mapping[str, Callable[[int], Sample]], rounds: int,
                after_round: Optional[Callable[[int, Dict[str, List[float]]], None]] = None
                ) -> Dict[str, List[float]]:
    """Runs every method once per round, in the order ``rotation`` gives, and keeps what each returns.

    Args:
        methods: name -> method. A method is called with the 0-based round number and returns the
            seconds it measured, or a sequence of seconds (e.g. one per training step), all of which are kept.
            It does its own set-up and clean-up around what it times (see ``timed``).
        rounds: how many rounds; at least 1.
        after_round: called after every round with the round number and the samples so far, e.g. to
            report progress (package code has no ``print``).

    Returns:
        name -> every sample of that method, in round order, keyed in the order of ``methods``.

    Raises:
        ValueError: if ``rounds`` is below 1 or ``methods`` is empty.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not allowed: use an integer, 1 or more")
    if not methods:
        raise ValueError("methods is empty: give at least one method to measure")
    names = list(methods)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotation(names, round_index):
            measured = methods[name](round_index)
            if isinstance(measured, (int, float)):
                samples[name].append(float(measured))
            else:
                samples[name].extend(float(value) for value in measured)
        if after_round is not None:
            after_round(round_index, samples)
    return samples


def timed(call: Callable[[], object]) -> float:
    """Seconds that ``call()`` took; what it returns is dropped only after the clock stops.

    Freeing a large result (a loaded state dict) can take long; it is not part of what is measured.
    """
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def medians(samples: Mapping[str, Sequence[float]]) -> Dict[str, float]:
    """name -> median of that name's samples.

    Raises:
        statistics.StatisticsError: if a name has no samples.
    """
    return {name: statistics.median(values) for name, values in samples.items()}


def ratios(values: Mapping[str, float], baseline: str) -> Dict[str, float]:
    """name -> ``values[name] / values[baseline]``: the baseline itself comes out as 1.0.

    Args:
        values: e.g. medians or throughputs, keyed by method.
        baseline: the method to divide by; it must be a key of ``values``.

    Raises:
        KeyError: if ``baseline`` is not in ``values``.
    """
    reference = values[baseline]
    return {name: value / reference for name, value in values.items()}


def format_ratio(ratio: float) -> str:
    """``2.5`` -> ``"2.50x"``."""
    return f"{ratio:.2f}x"
