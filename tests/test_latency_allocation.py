"""The knapsack under a latency budget, and the target registry (no torch-pruning, no timing)."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from deprune_plugin.core.allocation import Option, allocate, total
from deprune_plugin.core.latency import BlockLatency, LatencyReport, get_target, register_target, target_names


def _brute(units, budget, step):
    best = None
    for choice in itertools.product(*[range(len(u)) for u in units]):
        cells = sum(math.ceil(u[i].latency / step - 1e-9) for u, i in zip(units, choice))
        if cells * step > budget + 1e-12:
            continue
        loss = total(units, choice)[1]
        if best is None or loss < best - 1e-12:
            best = loss
    return best


def test_a_hand_checked_instance():
    # two units; budget 5: (2 + 3) costs loss 1 + 0 = 1, (1 + 4) costs 3 + 0.5; (4 + 1) infeasible? 4+1=5 ok, loss 0+2
    a = [Option(1, 3.0), Option(2, 1.0), Option(4, 0.0)]
    b = [Option(1, 2.0), Option(3, 0.0), Option(4, 0.5)]
    assert allocate([a, b], 5.0, resolution=50) == [1, 1]
    assert allocate([a, b], 2.0, resolution=50) == [0, 0]      # only the cheapest of each fits
    assert allocate([a, b], 1.9, resolution=50) is None         # nothing fits
    assert allocate([a, b], 100.0, resolution=50) == [2, 1]    # everything fits: least loss


@pytest.mark.parametrize("seed", range(40))
def test_optimal_on_its_grid_and_always_feasible(seed):
    rng = random.Random(seed)
    units = [[Option(rng.uniform(0, 3), rng.uniform(0, 5)) for _ in range(rng.randint(1, 4))]
             for _ in range(rng.randint(1, 5))]
    budget = rng.uniform(0.5, 8)
    res = 200
    choice = allocate(units, budget, resolution=res)
    best = _brute(units, budget, budget / res)
    if best is None:
        assert choice is None
        return
    lat, loss = total(units, choice)
    assert lat <= budget + 1e-9                      # feasible in real seconds, not only on the grid
    assert loss == pytest.approx(best, abs=1e-9)    # and optimal among grid-feasible choices


def test_a_wrong_dp_is_caught_by_the_brute_force():
    """The check above can fail: a greedy 'least loss per unit' pick violates the budget or the optimum."""
    units = [[Option(1, 3.0), Option(3, 0.0)], [Option(1, 3.0), Option(3, 0.0)]]
    greedy = [min(range(len(u)), key=lambda i: u[i].loss) for u in units]
    assert total(units, greedy)[0] > 4.0
    assert total(units, allocate(units, 4.0, 100))[1] == 3.0


def test_bad_input():
    with pytest.raises(ValueError, match="at least one option"):
        allocate([[]], 1.0)
    with pytest.raises(ValueError, match="resolution"):
        allocate([[Option(0, 0)]], 1.0, resolution=0)
    assert allocate([], 1.0) == []
    assert allocate([[Option(0.0, 1.0)]], 0.0) == [0]


def test_registry_names_and_errors():
    import deprune_plugin  # noqa: F401 - registers the accel targets

    assert {"openvino", "onnxruntime", "torch", "cuda"} <= set(target_names())
    with pytest.raises(ValueError, match="target must be one of"):
        get_target("tpu")
    with pytest.raises(TypeError, match="target must be"):
        get_target(3.5)

    @register_target("_test_fixed")
    class Fixed:
        name, modelled, alignment, taps_reason = "_test_fixed", True, 4, ""

        def seconds(self, module, inputs):
            return 1.0
    t = get_target("_test_fixed")
    assert get_target(t) is t


def test_report_lines_state_ratio_speedup_and_error():
    rep = LatencyReport("openvino", False, 0.7, dense_s=0.010, predicted_s=0.0072, measured_s=0.0070,
                        blocks=[BlockLatency("blocks.1.0", (96, 48), None, 0.0, 0.002, 0.001, 0.0011)],
                        taps_reason="no CPU runtime skips pruned DW taps")
    text = "\n".join(rep.lines())
    assert rep.speedup == pytest.approx(10 / 7)
    assert rep.model_error == pytest.approx(0.0072 / 0.0070 - 1)
    assert "70.0% of dense" in text and "speed-up 1.43x" in text and "+2.9%" in text
    assert "96->48" in text and "DW taps not pruned" in text
