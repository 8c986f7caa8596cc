"""KernelDispatcher: picks the fastest candidate per input signature, caches it, skips failing candidates."""
from __future__ import annotations

import itertools

import pytest
import torch

from deprune_plugin.kernels.dispatch import KernelDispatcher, default_timer, dispatch_key


class FakeClock:
    """Candidates advance this clock by their simulated cost; the timer reads it around one call."""

    def __init__(self) -> None:
        self.now = 0.0

    def timer(self, fn, device) -> float:
        t0 = self.now
        fn()
        return self.now - t0


def _candidates(clock: FakeClock, costs: dict[str, float], calls: dict[str, int]):
    def make(name):
        def run(x):
            calls[name] = calls.get(name, 0) + 1
            cost = costs[name]
            clock.now += cost(x) if callable(cost) else cost
            return (name, x)
        return run
    return {name: make(name) for name in costs}


def test_picks_fastest_and_runs_it():
    clock, calls = FakeClock(), {}
    d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0, "dr": 2.0}, calls),
                         warmup=2, reps=5, timer=clock.timer)
    x = torch.zeros(1, 4, 8, 8)
    name, out = d(x)
    assert name == "direct" and out is x
    key = dispatch_key(x)
    assert d.choice(key) == "direct"
    assert d.cache[key].timings == {"dense": 3.0, "direct": 1.0, "dr": 2.0}
    # warm-ups + reps for every candidate, plus the real call of the winner
    assert calls == {"dense": 7, "direct": 8, "dr": 7}


def test_uses_the_median_of_the_repetitions():
    clock, calls = FakeClock(), {}
    spikes = itertools.chain([100.0, 1.0, 1.0, 1.0, 1.0], itertools.repeat(1.0))  # an outlier must not decide
    d = KernelDispatcher(_candidates(clock, {"a": lambda x: next(spikes), "b": 1.5}, calls),
                         warmup=0, reps=5, timer=clock.timer)
    assert d(torch.zeros(2))[0] == "a"


def test_caches_per_key_and_retimes_for_a_new_key():
    clock, calls = FakeClock(), {}
    # "direct" is fast on small inputs, "dense" on large ones
    costs = {"dense": lambda x: 5.0, "direct": lambda x: 1.0 if x.shape[-1] < 16 else 9.0}
    d = KernelDispatcher(_candidates(clock, costs, calls), warmup=1, reps=3, timer=clock.timer)
    small, large = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 32, 32)
    assert d(small)[0] == "direct"
    timed_calls = dict(calls)
    assert d(small)[0] == "direct"  # cached: only the winner runs, nothing is re-timed
    assert calls == {"dense": timed_calls["dense"], "direct": timed_calls["direct"] + 1}
    assert d(large)[0] == "dense"   # new shape -> new timing
    assert d.choice(dispatch_key(small)) == "direct" and d.choice(dispatch_key(large)) == "dense"
    assert len(d.cache) == 2


def test_key_distinguishes_dtype_and_memory_format():
    x = torch.zeros(2, 3, 4, 5)
    keys = {dispatch_key(x), dispatch_key(x.half()), dispatch_key(x.to(memory_format=torch.channels_last))}
    assert len(keys) == 3
    assert dispatch_key(x)[3] == "contiguous"
    assert dispatch_key(x.to(memory_format=torch.channels_last))[3] == "channels_last"


def test_skips_raising_candidates_and_records_why():
    clock, calls = FakeClock(), {}
    cands = _candidates(clock, {"dense": 2.0, "direct": 1.0}, calls)

    def broken(x):
        raise ValueError("unsupported kernel size")
    cands = {"dr": broken, **cands, "direct": lambda x: (_ for _ in ()).throw(RuntimeError("no GPU"))}
    d = KernelDispatcher(cands, warmup=1, reps=3, timer=clock.timer)
    x = torch.zeros(3)
    assert d(x)[0] == "dense"
    choice = d.cache[dispatch_key(x)]
    assert choice.errors == {"dr": "ValueError: unsupported kernel size", "direct": "RuntimeError: no GPU"}
    assert set(choice.timings) == {"dense"}


def test_all_candidates_failing_raises_with_reasons():
    def broken(x):
        raise ValueError("nope")
    d = KernelDispatcher({"a": broken}, timer=FakeClock().timer)
    with pytest.raises(RuntimeError, match="a: ValueError: nope"):
        d(torch.zeros(1))
    assert d.cache == {}


def test_ties_go_to_the_first_listed_candidate():
    clock = FakeClock()
    d = KernelDispatcher(_candidates(clock, {"dense": 1.0, "direct": 1.0}, {}), reps=3, timer=clock.timer)
    assert d(torch.zeros(1))[0] == "dense"


def test_extra_arguments_are_forwarded():
    seen = []
    d = KernelDispatcher({"only": lambda x, s, k=0: seen.append((s, k)) or x}, warmup=1, reps=1,
                         timer=FakeClock().timer)
    d(torch.zeros(1), "s", k=3)
    assert seen and all(item == ("s", 3) for item in seen)


def test_default_timer_on_cpu_measures_wall_time():
    assert default_timer(lambda: sum(range(1000)), torch.device("cpu")) >= 0.0


def test_constructor_validation():
    with pytest.raises(ValueError, match="candidates"):
        KernelDispatcher({})
    with pytest.raises(TypeError, match="'x'"):
        KernelDispatcher({"x": 3})
    with pytest.raises(ValueError, match="reps"):
        KernelDispatcher({"x": lambda x: x}, reps=0)
