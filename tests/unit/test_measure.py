"""The benchmarks' interleaving helper: who runs when, how often, and what the medians and ratios come to."""

import pytest

from ds_fastckpt.cli.measure import format_ratio, interleaved, medians, ratios, rotation, timed


def recording(calls, values):
    """Methods that log (name, round) when called and return the next of their scripted values."""
    def method(name):
        scripted = iter(values[name])
        return lambda round_index: calls.append((name, round_index)) or next(scripted)
    return {name: method(name) for name in values}


def test_order_rotates_every_round_and_each_method_runs_once_per_round():
    calls = []
    methods = recording(calls, {"a": [1.0] * 4, "b": [2.0] * 4, "c": [3.0] * 4})
    interleaved(methods, rounds=4)
    orders = [[name for name, round_index in calls if round_index == r] for r in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [round_index for _, round_index in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_every_method_takes_every_position_equally_over_a_full_turn():
    names = ["w", "x", "y", "z"]
    firsts = [rotation(names, r)[0] for r in range(8)]
    assert sorted(firsts) == sorted(names * 2)
    assert rotation(names, 5) == ["x", "y", "z", "w"]


def test_samples_are_kept_in_round_order_and_method_order():
    calls = []
    samples = interleaved(recording(calls, {"slow": [5.0, 3.0, 4.0], "fast": [1.0, 2.0, 0.5]}), rounds=3)
    assert list(samples) == ["slow", "fast"]
    assert samples == {"slow": [5.0, 3.0, 4.0], "fast": [1.0, 2.0, 0.5]}
    assert len(calls) == 6


def test_a_method_may_return_several_samples_per_round():
    samples = interleaved({"steps": lambda round_index: [round_index, round_index + 0.5], "one": lambda _: 7},
                          rounds=2)
    assert samples == {"steps": [0.0, 0.5, 1.0, 1.5], "one": [7.0, 7.0]}


def test_after_round_sees_each_round_once_with_the_samples_so_far():
    seen = []
    interleaved({"a": lambda r: float(r), "b": lambda r: 10.0 + r}, rounds=3,
                after_round=lambda r, samples: seen.append((r, {k: list(v) for k, v in samples.items()})))
    assert seen == [(0, {"a": [0.0], "b": [10.0]}),
                    (1, {"a": [0.0, 1.0], "b": [10.0, 11.0]}),
                    (2, {"a": [0.0, 1.0, 2.0], "b": [10.0, 11.0, 12.0]})]


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_rounds_below_one_or_not_an_integer_are_refused(rounds):
    with pytest.raises(ValueError, match="rounds="):
        interleaved({"a": lambda _: 1.0}, rounds)


def test_no_methods_is_refused():
    with pytest.raises(ValueError, match="methods is empty"):
        interleaved({}, 1)


def test_medians_and_ratios_against_a_baseline():
    values = medians({"base": [4.0, 2.0, 100.0], "other": [1.0, 3.0, 2.0, 9.0], "odd": [7.0]})
    assert values == {"base": 4.0, "other": 2.5, "odd": 7.0}
    assert ratios(values, "base") == {"base": 1.0, "other": 0.625, "odd": 1.75}
    assert [format_ratio(r) for r in ratios(values, "other").values()] == ["1.60x", "1.00x", "2.80x"]
    with pytest.raises(KeyError):
        ratios(values, "missing")


def test_timed_returns_seconds_and_drops_the_result_after():
    dropped = []

    class Result:
        def __del__(self):
            dropped.append(True)

    seconds = timed(Result)
    assert isinstance(seconds, float) and seconds >= 0
    assert dropped == [True]
