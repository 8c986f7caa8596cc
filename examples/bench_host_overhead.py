"""Python cost of one FastDWConv call on the kernel path, with the kernel launch itself stubbed out.

Issue goal: <= 15 us of Python per call (the GPU's launch latency comes on top). Runs on the CPU: the layer
uses the host-emulation backend, whose launch function is replaced by a no-op, so what is timed is
everything that happens before a launch.

Two paths are timed side by side, in the same process, interleaved round by round:

- ``launcher``: what every call cost before launch plans: signature key, choice lookup, then the launcher
  (argument checks, output allocation, tile planning, ``specialize()`` with its path resolution and stat
  calls, argument packing) on every call;
- ``planned``: ``FastDWConv.__call__`` as it is now: the signature's launch plan
  (:mod:`deprune_plugin.kernels.planned`), i.e. one output allocation, two pointer writes and the launch.

Both include ``nn.Module.__call__``. Reported: the median over rounds of the mean per-call time.

    python examples/bench_host_overhead.py [--calls 20000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from deprune_plugin.accel import FastDWConv
from deprune_plugin.kernels import emulation
from deprune_plugin.kernels.dispatch import dispatch_key


def _launcher_path(layer: FastDWConv, x: torch.Tensor) -> torch.Tensor:
    """The forward as it was before plans: every call goes through the launcher."""
    if torch.compiler.is_compiling() or not layer._uses_kernels(x) or torch.jit.is_tracing():
        return layer.dense(x)
    name = layer.choices[dispatch_key(x)]
    return layer.dense(x) if name == "dense" else layer.run_kernel(name, x)


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = 144
    keep = torch.rand(c, 1, 3, 3) < 0.3
    print(f"FastDWConv {c} ch 3x3, input [1, {c}, 28, 28] channels_last, relu6, launch stubbed; "
          f"median of {args.rounds} rounds x {args.calls} calls")
    print(f"{'dtype':<9} {'kernel':<7} {'launcher us':>12} {'planned us':>11} {'speedup':>8}")
    for dtype in (torch.float32, torch.float16):
        layer = FastDWConv(torch.randn(c, 1, 3, 3) * keep, torch.randn(c), keep, (1, 1), (1, 1, 1, 1), (1, 1),
                           "relu6", backend="emu").to(dtype)
        x = torch.randn(1, c, 28, 28).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for name in ("direct", "dr"):
                layer.choices = {dispatch_key(x): name}  # as if chosen ahead of time
                torch.testing.assert_close(layer(x), layer.dense(x), rtol=1e-2, atol=1e-2)  # real run, planned
                real = emulation.launch
                emulation.launch = lambda *a, **k: None  # stub the launch itself
                try:
                    times: dict[str, list[float]] = {"launcher": [], "planned": []}
                    for _ in range(args.rounds):
                        times["launcher"].append(_time(functools.partial(_launcher_path, layer, x), args.calls))
                        times["planned"].append(_time(functools.partial(layer, x), args.calls))
                finally:
                    emulation.launch = real
                before, after = (statistics.median(times[k]) * 1e6 for k in ("launcher", "planned"))
                print(f"{str(dtype)[6:]:<9} {name:<7} {before:12.2f} {after:11.2f} {before / after:7.1f}x")


if __name__ == "__main__":
    main()
