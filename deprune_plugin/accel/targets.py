"""Latency targets the latency-aware pruner can prune for: the CPU runtimes, eager PyTorch and CUDA.

Registered by name in :mod:`deprune_plugin.core.latency` (``DEPruner(..., target="openvino")``):

- ``"openvino"``, ``"onnxruntime"``: the module is exported to ONNX and timed in the runtime (fp32, the
  runtime's own threads), median of repeated calls after a warm-up. A missing runtime falls back to
  ``"torch"`` with one warning.
- ``"torch"``: eager PyTorch on the CPU, the same timing.
- ``"cuda"``: with a CUDA GPU and CuPy, ``accelerate()`` of the module timed on the GPU (device clock);
  otherwise **modelled**: a roofline per kernel on the architecture's data (:data:`kernels.report.ARCHS`):
  ``max(bytes / copy bandwidth, flops / peak) + launch floor``; DW convs on CUDA cores (kept taps only, at
  :data:`DW_FMA_EFFICIENCY` of the FMA peak),
  1x1 and dense convs on tensor cores; a DW conv whose output only feeds the next 1x1 conv runs fused with
  it (its output never reaches memory), BN and activations ride in the kernels' epilogues.

Channel alignment: OpenVINO's and oneDNN's CPU kernels use blocked layouts of 8 (AVX2) or 16 (AVX-512)
channels; CUDA fp16 vectors and tensor-core tiles take 8.
"""
from __future__ import annotations

import copy
import functools
import statistics
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.latency import register_target
from ..core.masks import is_depthwise, remove_tap_masks, tap_mask
from ..kernels.report import ARCHS, LAUNCH_FLOOR_S
from .runtimes import RUNTIMES, runtime_available, to_onnx

__all__ = ["RuntimeTarget", "TorchTarget", "CudaTarget", "cpu_alignment"]

CPU_TAPS_REASON = ("no CPU runtime (OpenVINO, ONNX Runtime, oneDNN) skips pruned DW taps: they would cost "
                   "accuracy and save no time")

#: FP32 lanes per SM (CUDA cores); 16-bit math issues two per lane (packed HFMA2).
FP32_LANES_PER_SM = {"sm_80": 64, "sm_90": 128}
#: Fraction of the CUDA-core FMA peak a DW kernel is assumed to reach: each FMA needs a shared-memory
#: load or a shuffle beside it, so at most about half the instruction slots do math.
DW_FMA_EFFICIENCY = 0.5


@functools.lru_cache(maxsize=1)
def cpu_alignment() -> int:
    """Channels per blocked-layout vector of this CPU's fp32 kernels: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def _median_seconds(fn: Callable[[], Any], reps: int, warmup: int, budget_s: float) -> float:
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inference_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module).eval()
    remove_tap_masks(m)  # pruned taps are zero in the weights; the checking hooks cost time
    return m


class TorchTarget:
    """Eager PyTorch on the CPU (``torch.get_num_threads()`` threads)."""

    name = "torch"
    modelled = False
    taps_reason = CPU_TAPS_REASON

    def __init__(self, reps: int = 15, warmup: int = 3, time_budget_s: float = 0.5) -> None:
        self.reps, self.warmup, self.time_budget_s = reps, warmup, time_budget_s
        self.alignment = cpu_alignment()

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        """A zero-argument call of ``module(*inputs)`` as it runs here (for interleaved timing)."""
        m = _inference_copy(module)

        def run() -> Any:
            with torch.inference_mode():
                return m(*inputs)
        return run

    def seconds(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        return _median_seconds(self.runner(module, inputs), self.reps, self.warmup, self.time_budget_s)


class RuntimeTarget:
    """A CPU runtime (``"openvino"`` or ``"onnxruntime"``), fp32, timed on the module exported to ONNX."""

    modelled = False
    taps_reason = CPU_TAPS_REASON

    def __init__(self, name: str, threads: int | None = None, reps: int = 15, warmup: int = 3,
                 time_budget_s: float = 0.5) -> None:
        if name not in RUNTIMES:
            raise ValueError(f"target must be one of {sorted(RUNTIMES)}, got {name!r}")
        self.name = name
        self.threads = threads or torch.get_num_threads()
        self.reps, self.warmup, self.time_budget_s = reps, warmup, time_budget_s
        self.alignment = cpu_alignment()

    def runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        """A zero-argument call of the module's runtime session on ``inputs`` (for interleaved timing)."""
        m = _inference_copy(module)
        inputs = tuple(x.detach().float().cpu() for x in inputs)
        session = RUNTIMES[self.name].build(to_onnx(m, inputs, dynamic=False), self.threads)
        arrays = [np.ascontiguousarray(x.numpy()) for x in inputs]
        return lambda: session.run(arrays)

    def runners(self, jobs: Sequence[tuple[nn.Module, tuple[torch.Tensor, ...]]]) -> list[Callable[[], Any]]:
        """One runner per ``(module, inputs)``, each module taking one tensor, converted together: the
        modules become one graph with an input and an output per module (one trace), cut into one
        compiled sub-graph per module. Converting is what costs (seconds per trace); compiling a block is
        cheap."""
        if any(len(x) != 1 for _, x in jobs):
            return [self.runner(m, x) for m, x in jobs]
        bundle = _Bundle([_inference_copy(m) for m, _ in jobs]).eval()
        xs = tuple(x[0].detach().float().cpu() for _, x in jobs)
        arrays = [np.ascontiguousarray(x.numpy()) for x in xs]
        if self.name == "openvino":
            import openvino as ov

            core = ov.Core()
            with torch.no_grad():
                graph = ov.convert_model(bundle, example_input=xs)
            params = graph.get_parameters()
            out = []
            for i, a in enumerate(arrays):
                part = ov.Model([graph.outputs[i]], [params[i]])
                compiled = core.compile_model(part, "CPU", _ov_config(self.threads))
                out.append(functools.partial(_call_compiled, compiled, a))
            return out
        import onnx
        from onnx.utils import Extractor

        full = onnx.load_model_from_string(to_onnx(bundle, xs, dynamic=False))
        cut = Extractor(full)
        out = []
        for i, a in enumerate(arrays):
            part = cut.extract_model([full.graph.input[i].name], [full.graph.output[i].name])
            session = RUNTIMES[self.name].build(part.SerializeToString(), self.threads)
            out.append(functools.partial(session.run, [a]))
        return out

    def seconds(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        return _median_seconds(self.runner(module, inputs), self.reps, self.warmup, self.time_budget_s)


class _Bundle(nn.Module):
    """Several single-input modules as one graph: ``forward(x0, x1, ...) -> (m0(x0), m1(x1), ...)``."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.parts, xs))


def _ov_config(threads: int) -> dict[str, Any]:
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _call_compiled(compiled: Any, array: np.ndarray) -> Any:
    return compiled([array])


def _runtime_target(name: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        ok, why = runtime_available(name)
        if not ok:
            warnings.warn(f"target {name!r}: {why}; timing eager PyTorch on the CPU instead", stacklevel=3)
            return TorchTarget(**{k: v for k, v in kwargs.items() if k != "threads"})
        return RuntimeTarget(name, **kwargs)
    return build


for _name in RUNTIMES:
    register_target(_name)(_runtime_target(_name))
register_target("torch")(TorchTarget)


class CudaTarget:
    """CUDA: measured through ``accelerate()`` on a GPU with CuPy, else the roofline model (see the module
    doc) on ``arch`` (``"sm_90"``: H100, ``"sm_80"``: A100) in ``dtype``."""

    name = "cuda"
    alignment = 8
    taps_reason = ""  # taps pay where the DW work is compute-bound: the knapsack sees it per block

    def __init__(self, arch: str | None = None, dtype: torch.dtype = torch.float16, measure: bool | None = None,
                 reps: int = 20) -> None:
        if arch is not None and arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        if measure is None:
            measure = torch.cuda.is_available() and runtime_cupy()
        if arch is None:
            arch = "sm_90"
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                arch = f"sm_{major}{minor}" if f"sm_{major}{minor}" in ARCHS else arch
        self.arch, self.dtype, self.measure, self.reps = ARCHS[arch], dtype, bool(measure), reps
        self.modelled = not self.measure

    def seconds(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        if self.measure:
            return self._measured(module, inputs)
        return modelled_seconds(module, inputs, self.arch.name, torch.finfo(self.dtype).bits // 8)

    def _measured(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        from ..core.timing import time_call
        from .api import accelerate
        dev = torch.device("cuda")
        m = copy.deepcopy(module).eval().to(dev, self.dtype)
        xs = tuple(x.to(dev, self.dtype) for x in inputs)
        fast = accelerate(m, backend="cuda", example_inputs=xs)
        with torch.inference_mode():
            for _ in range(3):
                fast(*xs)
            return time_call(lambda: fast(*xs), dev, reps=self.reps).device_s


def runtime_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: no CuPy
        return False
    return True


register_target("cuda")(CudaTarget)


@torch.no_grad()
def modelled_seconds(module: nn.Module, inputs: tuple[torch.Tensor, ...], arch: str, elem_bytes: int) -> float:
    """Roofline time of ``module(*inputs)`` on ``arch`` (see the module doc). Only convs and linears are
    kernels; everything else is assumed fused into their epilogues."""
    spec = ARCHS[arch]
    bw = spec.copy_tbps * 1e12
    cuda_core = spec.sms * FP32_LANES_PER_SM.get(arch, 64) * 2 * spec.clock_ghz * 1e9 * (2 if elem_bytes == 2 else 1) \
        * DW_FMA_EFFICIENCY
    tensor = spec.tensor_tflops * 1e12 if elem_bytes == 2 else spec.tensor_tflops * 1e12 / 2  # tf32: half rate
    calls: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []

    def hook(mod, args, out):
        calls.append((mod, tuple(args[0].shape), tuple(out.shape)))
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        module.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()
    kernels = []  # (bytes, cuda-core flops, tensor flops)
    i = 0
    while i < len(calls):
        mod, sin, sout = calls[i]
        n_in, n_out = int(np.prod(sin)), int(np.prod(sout))
        if is_depthwise(mod):
            mask = tap_mask(mod)
            kept = int(mask.sum()) if mask is not None else int((mod.weight != 0).sum())
            pixels = n_out // mod.out_channels
            kern = [n_in * elem_bytes + kept * elem_bytes, 2 * pixels * kept, 0]
            nxt = calls[i + 1] if i + 1 < len(calls) else None
            if nxt is not None and isinstance(nxt[0], nn.Conv2d) and nxt[0].kernel_size == (1, 1) and \
                    nxt[1] == sout and nxt[0].groups == 1:
                n2 = int(np.prod(nxt[2]))
                kern[0] += n2 * elem_bytes + nxt[0].weight.numel() * elem_bytes
                kern[2] = 2 * n2 * nxt[0].in_channels
                i += 1
            else:
                kern[0] += n_out * elem_bytes
            kernels.append(kern)
        else:
            w = mod.weight.numel()
            macs = n_out * (w // (mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features))
            kernels.append([(n_in + n_out + w) * elem_bytes, 0, 2 * macs])
        i += 1
    return sum(max(b / bw, cc / cuda_core + tc / tensor) + LAUNCH_FLOOR_S for b, cc, tc in kernels)
