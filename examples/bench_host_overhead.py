"""Python cost of one FastDWConv call on the kernel path, with the kernel launch itself stubbed out.

Issue goal: <= 15 us of Python per call (the GPU's launch latency comes on top). Runs on the CPU: the layer
uses the host-emulation backend, whose launch function is replaced by a no-op, so what is timed is
everything that happens before a launch: the signature lookup, the cached formats, argument checks,
output allocation, the launch plan, argument packing.

    python examples/bench_host_overhead.py [--calls 20000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deprune_plugin.accel import FastDWConv
from deprune_plugin.kernels import emulation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    c = 144
    keep = torch.rand(c, 1, 3, 3) < 0.3
    layer = FastDWConv(torch.randn(c, 1, 3, 3) * keep, torch.randn(c), keep, (1, 1), (1, 1, 1, 1), (1, 1), "relu6",
                       backend="emu")
    x = torch.randn(1, c, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for name in ("direct", "dr"):
            layer.choices = {}
            layer(x)  # first call: real emulated kernels, checked and timed once
            key = next(iter(layer.choices))
            layer.choices[key] = name
            real = emulation.launch
            emulation.launch = lambda *a, **k: None  # stub the launch itself
            try:
                per_call = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        layer(x)
                    per_call.append((time.perf_counter() - t0) / args.calls)
            finally:
                emulation.launch = real
            print(f"FastDWConv -> {name:<6}: {statistics.median(per_call) * 1e6:6.2f} us per call "
                  f"(median of {args.rounds} rounds x {args.calls} calls, launch stubbed)")


if __name__ == "__main__":
    main()
