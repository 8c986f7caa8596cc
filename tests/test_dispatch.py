"""KernelDispatcher: checks candidates against the reference, drops wrong or failing ones (and says why),
picks the fastest per input signature, caches it; and the timer it uses."""
from __future__ import annotations

import itertools
import threading
import time
import warnings

import pytest
import torch

from deprune_plugin.core.timing import CallTime, interleaved_medians, time_call
from deprune_plugin.kernels.dispatch import KernelDispatcher, dispatch_key, is_cuda_error


class FakeClock:
    """Candidates advance this clock by their simulated cost; the timer reads it around one call."""

    def __init__(self) -> None:
        self.now = 0.0

    def timer(self, fn, device) -> CallTime:
        t0 = self.now
        fn()
        return CallTime(self.now - t0, 1e-6)


def _candidates(clock: FakeClock, costs: dict, calls: dict[str, int], wrong: frozenset = frozenset()):
    """Candidates computing ``x * 2`` (or ``x * 2 + 1`` for the names in ``wrong``) at a simulated cost."""
    def make(name):
        def run(x):
            calls[name] = calls.get(name, 0) + 1
            cost = costs[name]
            clock.now += cost(x) if callable(cost) else cost
            return x * 2 + (1 if name in wrong else 0)
        return run
    return {name: make(name) for name in costs}


def test_picks_fastest_and_runs_it():
    clock, calls = FakeClock(), {}
    d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0, "dr": 2.0}, calls),
                         warmup=2, reps=5, calls_per_sample=1, timer=clock.timer)
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert torch.equal(d(x), x * 2)
    key = dispatch_key(x)
    assert d.choice(key) == "direct"
    assert d.cache[key].timings == {"dense": 3.0, "direct": 1.0, "dr": 2.0}
    assert d.cache[key].host == {"dense": 1e-6, "direct": 1e-6, "dr": 1e-6} and d.cache[key].dropped == {}
    # 1 check call + 2 warm-ups + 5 reps for every candidate, plus the real call of the winner
    assert calls == {"dense": 8, "direct": 9, "dr": 8}


def test_a_disagreeing_candidate_is_dropped_warned_once_and_reported():
    clock, calls = FakeClock(), {}
    d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0}, calls, wrong=frozenset({"direct"})),
                         warmup=0, reps=2, timer=clock.timer, label="blocks.1.0.conv_dw")
    x, y = torch.ones(1, 2, 3, 3), torch.ones(1, 2, 5, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert torch.equal(d(x), x * 2)  # the fast but wrong kernel is not used
        assert torch.equal(d(y), y * 2)  # a second signature: dropped again, not warned again
    ours = [str(m.message) for m in w if "dropped" in str(m.message)]
    assert len(ours) == 1 and "'direct'" in ours[0] and "blocks.1.0.conv_dw" in ours[0], ours
    choice = d.cache[dispatch_key(x)]
    assert choice.name == "dense" and set(choice.timings) == {"dense"}
    assert choice.dropped["direct"].startswith("disagrees with dense: max abs err 1")


def test_the_check_can_fail_only_when_outputs_differ():
    """The same candidates with the bug removed are all kept: the drop above is due to the wrong output."""
    clock = FakeClock()
    d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0}, {}), warmup=0, reps=1, timer=clock.timer)
    assert d.select(torch.ones(2, 3)).dropped == {} and d.select(torch.ones(2, 3)).name == "direct"


def test_slack_widens_the_check_by_the_references_own_error_and_no_further():
    """A candidate 1.0 off (x * 2 + 1, reference scale ~2) passes with slack 1.01, not with 0.99: the slack is
    an absolute error the reference may carry, asked once per selection with the reference's output."""
    seen = []

    def pick(slack: float) -> dict:
        clock = FakeClock()
        d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0}, {}, wrong=frozenset({"direct"})),
                             warmup=0, reps=1, timer=clock.timer,
                             slack=lambda ref, x: seen.append((ref.clone(), x.shape)) or slack)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return d.select(torch.ones(2, 3)).dropped
    assert pick(1.01) == {}
    assert "slack 0.99" in pick(0.99)["direct"]
    assert len(seen) == 2 and torch.equal(seen[0][0], torch.full((2, 3), 2.0)) and seen[0][1] == (2, 3)


def test_samples_batch_calls_and_report_per_call_times():
    clock, calls = FakeClock(), {}
    d = KernelDispatcher(_candidates(clock, {"dense": 3.0, "direct": 1.0}, calls), warmup=1, reps=3,
                         calls_per_sample=4, timer=clock.timer)
    choice = d.select(torch.ones(3))
    assert choice.timings == {"dense": 3.0, "direct": 1.0}  # per call, not per 4-call sample
    assert calls == {"dense": 1 + 1 + 3 * 4, "direct": 1 + 1 + 3 * 4}  # check + warm-up + 3 samples of 4


def test_uses_the_median_of_the_repetitions():
    clock, calls = FakeClock(), {}
    spikes = itertools.chain([100.0, 1.0, 1.0, 1.0, 1.0], itertools.repeat(1.0))  # an outlier must not decide
    costs = {"a": lambda x: next(spikes), "b": 1.5}
    d = KernelDispatcher(_candidates(clock, costs, calls), warmup=0, reps=5, calls_per_sample=1, timer=clock.timer)
    d(torch.zeros(2))
    assert d.choice(dispatch_key(torch.zeros(2))) == "a"


def test_caches_per_key_and_retimes_for_a_new_key():
    clock, calls = FakeClock(), {}
    # "direct" is fast on small inputs, "dense" on large ones
    costs = {"dense": lambda x: 5.0, "direct": lambda x: 1.0 if x.shape[-1] < 16 else 9.0}
    d = KernelDispatcher(_candidates(clock, costs, calls), warmup=1, reps=3, timer=clock.timer)
    small, large = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 32, 32)
    d(small)
    timed_calls = dict(calls)
    d(small)  # cached: only the winner runs, nothing is re-checked or re-timed
    assert calls == {"dense": timed_calls["dense"], "direct": timed_calls["direct"] + 1}
    d(large)
    assert d.choice(dispatch_key(small)) == "direct" and d.choice(dispatch_key(large)) == "dense"
    assert len(d.cache) == 2


def test_key_distinguishes_dtype_and_memory_format():
    x = torch.zeros(2, 3, 4, 5)
    keys = {dispatch_key(x), dispatch_key(x.half()), dispatch_key(x.to(memory_format=torch.channels_last))}
    assert len(keys) == 3
    assert dispatch_key(x)[3] == "contiguous"
    assert dispatch_key(x.to(memory_format=torch.channels_last))[3] == "channels_last"


def test_raising_candidates_are_dropped_with_the_reason():
    clock, calls = FakeClock(), {}
    cands = _candidates(clock, {"dense": 2.0}, calls)

    def broken(x):
        raise ValueError("unsupported kernel size")
    cands = {**cands, "dr": broken, "direct": lambda x: (_ for _ in ()).throw(RuntimeError("no GPU"))}
    d = KernelDispatcher(cands, warmup=1, reps=3, timer=clock.timer)
    x = torch.zeros(3)
    with pytest.warns(RuntimeWarning, match="dropped"):
        d(x)
    choice = d.cache[dispatch_key(x)]
    assert choice.name == "dense"
    assert choice.dropped == {"dr": "raised ValueError: unsupported kernel size",
                              "direct": "raised RuntimeError: no GPU"}
    assert set(choice.timings) == {"dense"}


def test_a_cuda_error_is_reraised_not_masked_by_the_fallback():
    clock = FakeClock()

    def sticky(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    d = KernelDispatcher({**_candidates(clock, {"dense": 1.0}, {}), "direct": sticky}, timer=clock.timer)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        d(torch.zeros(1))
    assert d.cache == {}


def test_is_cuda_error_reads_types_messages_and_causes():
    class CUDARuntimeError(Exception):
        pass
    assert is_cuda_error(CUDARuntimeError("cudaErrorLaunchFailure"))
    assert is_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    try:
        try:
            raise CUDARuntimeError("x")
        except CUDARuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert is_cuda_error(outer)
    assert not is_cuda_error(ValueError("kernel size 9 unsupported"))


def test_a_failing_reference_raises():
    def broken(x):
        raise ValueError("nope")
    d = KernelDispatcher({"a": broken}, timer=FakeClock().timer)
    with pytest.raises(ValueError, match="nope"):
        d(torch.zeros(1))
    assert d.cache == {}


def test_reference_is_checked_against_even_when_listed_later():
    clock = FakeClock()
    cands = _candidates(clock, {"fast": 1.0, "dense": 2.0}, {}, wrong=frozenset({"fast"}))
    d = KernelDispatcher(cands, reference="dense", warmup=0, reps=1, timer=clock.timer)
    with pytest.warns(RuntimeWarning, match="'fast' dropped"):
        choice = d.select(torch.ones(2))
    assert choice.name == "dense" and "fast" in choice.dropped
    with pytest.raises(ValueError, match="reference"):
        KernelDispatcher(cands, reference="cudnn")


def test_ties_go_to_the_first_listed_candidate():
    clock = FakeClock()
    d = KernelDispatcher(_candidates(clock, {"dense": 1.0, "direct": 1.0}, {}), reps=3, timer=clock.timer)
    assert d.select(torch.zeros(1)).name == "dense"


def test_selection_is_thread_safe_one_selection_per_signature():
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def slow(name):
        def run(x):
            with lock:
                calls[name] = calls.get(name, 0) + 1
            time.sleep(0.01)
            return x * 2
        return run
    d = KernelDispatcher({"dense": slow("dense"), "direct": slow("direct")}, warmup=0, reps=1, calls_per_sample=1,
                         timer=lambda fn, dev: (fn(), 1.0)[1])
    x = torch.ones(4)
    threads = [threading.Thread(target=d, args=(x,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one check call + one timed call per candidate, then one real call per thread (the winner "dense")
    assert calls == {"dense": 2 + 4, "direct": 2}


def test_restore_reuses_a_saved_choice_without_timing():
    calls: dict[str, int] = {}
    d = KernelDispatcher(_candidates(FakeClock(), {"dense": 1.0, "direct": 0.5}, calls), timer=FakeClock().timer)
    key = dispatch_key(torch.zeros(2, 2))
    d.restore(key, "direct")
    d(torch.zeros(2, 2))
    assert calls == {"direct": 1}
    with pytest.raises(ValueError, match="candidate"):
        d.restore(key, "cudnn")


def test_extra_arguments_are_forwarded():
    seen = []
    d = KernelDispatcher({"only": lambda x, s, k=0: seen.append((s, k)) or x}, warmup=1, reps=1,
                         timer=FakeClock().timer)
    d(torch.zeros(1), "s", k=3)
    assert seen and all(item == ("s", 3) for item in seen)


def test_constructor_validation():
    with pytest.raises(ValueError, match="candidates"):
        KernelDispatcher({})
    with pytest.raises(TypeError, match="'x'"):
        KernelDispatcher({"x": 3})
    with pytest.raises(ValueError, match="reps"):
        KernelDispatcher({"x": lambda x: x}, reps=0)
    with pytest.raises(ValueError, match="calls_per_sample"):
        KernelDispatcher({"x": lambda x: x}, calls_per_sample=0)


# ---- the timer ----------------------------------------------------------------------------------

def test_cpu_timer_measures_the_calls_and_averages_over_reps():
    t = time_call(lambda: time.sleep(0.02), "cpu", reps=3)
    assert 0.02 <= t.device_s < 0.2 and t.host_s == t.device_s
    n = []
    time_call(lambda: n.append(1), "cpu", reps=7)
    assert len(n) == 7
    with pytest.raises(ValueError, match="reps"):
        time_call(lambda: None, "cpu", reps=0)
    with pytest.raises(ValueError, match="clock"):
        time_call(lambda: None, "cpu", clock="cpu-ish")


def test_interleaved_medians_round_robin_order_and_medians():
    order: list[str] = []
    med = interleaved_medians({"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.01))},
                              reps=3, warmup=1)
    # a warm-up round, then three timed rounds, interleaved, each starting one candidate later
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert med["b"] >= 0.01 > med["a"]


def test_the_default_timer_queues_its_gpu_sleep_for_every_call_of_a_sample(monkeypatch):
    """With the default timer one sample is one time_call over calls_per_sample back-to-back calls, so the
    GPU sleep that keeps the device busy is sized for all of them (not for one)."""
    import deprune_plugin.kernels.dispatch as dispatch
    from deprune_plugin.core.timing import CallTime

    seen: list[int] = []

    def fake_time_call(fn, device="cpu", reps=1, clock="device"):
        seen.append(reps)
        for _ in range(reps):
            fn()
        return CallTime(1e-3, 2e-4)

    monkeypatch.setattr(dispatch, "time_call", fake_time_call)
    d = dispatch.KernelDispatcher({"dense": lambda x: x + 1, "direct": lambda x: x + 1}, warmup=0, reps=3,
                                  calls_per_sample=4)
    choice = d.select(torch.zeros(3))
    assert seen == [4] * 6  # 3 samples x 2 candidates, each of 4 calls in one timed window
    assert choice.timings == {"dense": 1e-3, "direct": 1e-3} and choice.host == {"dense": 2e-4, "direct": 2e-4}


def test_threads_calling_a_layer_first_share_one_dispatcher(monkeypatch):
    import deprune_plugin.accel.modules as modules

    real = modules.KernelDispatcher

    class SlowToBuild(real):
        def __init__(self, *a, **kw):
            time.sleep(0.05)  # widens the race a missing lock would lose
            super().__init__(*a, **kw)

    monkeypatch.setattr(modules, "KernelDispatcher", SlowToBuild)
    w = torch.randn(8, 1, 3, 3)
    layer = modules.FastDWConv(w, torch.zeros(8), torch.ones_like(w, dtype=torch.bool), (1, 1), (1, 1, 1, 1),
                               (1, 1), "identity")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(layer.dispatcher())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(d is got[0] for d in got)


def test_a_gap_before_each_sample_is_idle_time_not_timed(monkeypatch):
    """gap_s sleeps before every timed sample (round-robin order kept) and is not part of any timing."""
    import deprune_plugin.core.timing as timing
    import deprune_plugin.kernels.dispatch as dispatch

    slept: list[float] = []
    order: list[str] = []
    monkeypatch.setattr(dispatch.time, "sleep", lambda s: slept.append(s))
    monkeypatch.setattr(timing.time, "sleep", lambda s: slept.append(s))
    d = dispatch.KernelDispatcher({"a": lambda x: order.append("a") or x, "b": lambda x: order.append("b") or x},
                                  warmup=0, reps=3, calls_per_sample=1, check=False, gap_s=0.005)
    d.select(torch.zeros(2))
    assert slept == [0.005] * 6
    assert order[2:] == ["a", "b"] * 3  # after one check call each: samples taken round-robin
    slept.clear()
    t = timing.interleaved_medians({"x": lambda: None, "y": lambda: None}, reps=4, warmup=0, gap_s=0.01)
    assert slept == [0.01] * 8 and all(v < 0.01 for v in t.values())


def test_a_margin_keeps_the_listed_preference_unless_a_later_candidate_is_clearly_faster():
    def pick(costs: dict, margin: float) -> str:
        clock = FakeClock()
        d = KernelDispatcher(_candidates(clock, costs, {}), timer=clock.timer, margin=margin)
        return d.select(torch.zeros(2)).name

    assert pick({"dense": 1.0, "direct": 0.95}, 0.0) == "direct"  # plain fastest
    assert pick({"dense": 1.0, "direct": 0.95}, 0.1) == "dense"   # 5% faster: within the margin
    assert pick({"dense": 1.0, "direct": 0.85}, 0.1) == "direct"  # 15% faster: chosen
    assert pick({"dense": 1.0, "direct": 0.95, "dr": 0.80}, 0.1) == "dr"
    with pytest.raises(ValueError, match="margin"):
        KernelDispatcher({"dense": lambda x: x}, margin=1.0)


# ---- the reference is computed without TF32 ----------------------------------------------------------

def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on():
    """Both TF32 flags on (cuDNN's is PyTorch's default), whatever they were; restored after the test."""
    saved = _tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_no_tf32_turns_both_flags_off_and_restores_them_also_on_error(tf32_on):
    from deprune_plugin.core.precision import no_tf32
    with no_tf32():
        assert _tf32_flags() == (False, False)
        with no_tf32():
            assert _tf32_flags() == (False, False)
        assert _tf32_flags() == (False, False)  # the inner block restores what it found: off
    assert _tf32_flags() == (True, True)
    with pytest.raises(RuntimeError, match="inside"):
        with no_tf32():
            raise RuntimeError("inside")
    assert _tf32_flags() == (True, True)
    torch.backends.cuda.matmul.allow_tf32 = False  # mixed settings come back as they were
    with no_tf32():
        pass
    assert _tf32_flags() == (True, False)


def test_the_reference_and_its_slack_run_without_tf32_and_the_flags_come_back(tf32_on):
    """The check's reference call (the first call of the reference candidate) and the slack see TF32 off; the
    other candidates and the timed calls run with the caller's flags, which hold again afterwards."""
    calls: dict[str, list[tuple[bool, bool]]] = {"dense": [], "direct": [], "slack": []}

    def record(name, out=None):
        def fn(x, *rest):
            calls[name].append(_tf32_flags())
            return x * 2 if out is None else out
        return fn

    d = KernelDispatcher({"dense": record("dense"), "direct": record("direct")}, warmup=0, reps=2,
                         calls_per_sample=1, timer=FakeClock().timer, slack=record("slack", 0.0))
    d.select(torch.ones(1, 2, 3, 3))
    assert calls == {"dense": [(False, False), (True, True), (True, True)],
                     "direct": [(True, True)] * 3, "slack": [(False, False)]}
    assert _tf32_flags() == (True, True)


def test_flags_come_back_when_the_reference_raises(tf32_on):
    def dense(x):
        assert _tf32_flags() == (False, False)
        raise RuntimeError("no reference")

    d = KernelDispatcher({"dense": dense, "direct": lambda x: x}, warmup=0, reps=1, timer=FakeClock().timer)
    with pytest.raises(RuntimeError, match="no reference"):
        d.select(torch.ones(1, 2, 3, 3))
    assert _tf32_flags() == (True, True)


def test_cold_l2_timing_flushes_before_every_call_and_counts_only_the_calls(monkeypatch):
    """With ``cold_l2`` each call gets its own events after an L2 flush, so the flush's time is not counted."""
    import contextlib

    import deprune_plugin.core.timing as timing

    log: list[str] = []
    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = None

        def record(self) -> None:
            log.append("record")
            self.t = clock[0]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: "FakeEvent") -> float:  # milliseconds, as CUDA events give them
            return (other.t - self.t) * 1e3

    def fake_flush(device) -> None:
        log.append("flush")
        clock[0] += 5.0  # an expensive flush: must not show in the result

    def fn() -> None:
        log.append("call")
        clock[0] += 0.25

    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(timing.torch.cuda, "_sleep", lambda cycles: None)
    monkeypatch.setattr(timing, "flush_l2", fake_flush)
    t = timing.time_call(fn, torch.device("cuda", 0), reps=3, cold_l2=True)
    assert log == ["flush", "record", "call", "record"] * 3
    assert t.device_s == pytest.approx(0.25)
    log.clear()
    warm = timing.time_call(fn, torch.device("cuda", 0), reps=3)  # default: back to back, no flush
    assert log == ["record", "call", "call", "call", "record"] and warm.device_s == pytest.approx(0.25)
