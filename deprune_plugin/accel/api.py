"""``accelerate(model)``: one call swaps depth-wise convs for fast inference modules.

Like torchao's ``sparsify_``: a config object and a filter function; unlike it, the result is a new
module (the input model is not changed) in eval mode, with ``deprune_report`` saying what was replaced
by which implementation and what was left and why. Knows nothing of pruning beyond the tap masks.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from .convert import ReportEntry, plan_edits
from .fold import find_chains, trace_calls
from .fused import FusedDSConv, fused_kernel_available, plan_pair_edits, plan_residual_edits
from .graphs import CUDAGraphModel
from .modules import FastDWConv
from .runtimes import RUNTIMES, RuntimeModel, runtime_available, to_onnx
from .selfcheck import check_inputs, outputs_agree, verify_edits

#: what ``accelerate(backend=...)`` accepts: ``"auto"``, the CUDA kernels, the plain torch path, or a CPU
#: runtime (:data:`~deprune_plugin.accel.runtimes.RUNTIMES`).
BACKENDS = ("auto", "cupy", "torch", *RUNTIMES)


@dataclass(frozen=True)
class AccelerateConfig:
    """Options of :func:`accelerate`.

    Attributes:
        channels_last: run the model in channels_last (oneDNN's fast DW path on CPU, cuDNN's on GPU).
        fold_batchnorm: fold every conv -> BatchNorm pair (not only depth-wise ones).
        group_size, tile: DR layout for the CUDA DR kernel (match the pruner's).
        fuse_pairs: on the kernel backend, fuse each DW conv with the 1x1 conv that alone reads its output
            (:mod:`~deprune_plugin.accel.fused`), chosen per signature against the unfused pair by measurement.
        cuda_graphs: on CUDA, capture the whole forward as one CUDA graph per input signature and replay it
            (:class:`~deprune_plugin.accel.graphs.CUDAGraphModel`): at batch 1 launch overhead dominates.
        cpu_runtimes: the CPU runtimes ``backend="auto"`` tries on a CPU model (those installed), each
            checked against the model; the result runs, per input signature, the fastest of them and the
            torch path (:class:`~deprune_plugin.accel.runtimes.RuntimeModel`). ``()`` keeps the torch path.
        select_reps: timed samples per runner of that choice, made per input signature on first use.
    """

    channels_last: bool = True
    fold_batchnorm: bool = True
    cpu_runtimes: tuple[str, ...] = tuple(RUNTIMES)
    select_reps: int = 10
    group_size: int = 32
    tile: int = 32
    cuda_graphs: bool = False
    fuse_pairs: bool = True


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did.

    Attributes:
        backend: the backend used (after any fallback): ``"cupy"``, ``"torch"`` or a CPU runtime.
        entries: one :class:`ReportEntry` per module looked at: ``"replaced"`` (FastDWConv), ``"folded"``
            (BatchNorm folded into a conv), ``"fused"`` / ``"unfused"`` (DW + PW pairs, with the reason) or
            ``"left"`` (with the reason).
        fallback_reason: why ``backend="auto"`` fell back, if it did.
        checks: which self-checks ran and their outcome.
        kernels: per replaced layer on the kernel backends, the kernel chosen for the example input's
            signature, each candidate's device and host time, and the candidates dropped and why.
        cuda_graphs: with ``config.cuda_graphs``: per input signature seen, ``"captured"`` or why it ran
            eagerly (filled as signatures arrive).
        runtimes: on a CPU, per runtime tried (and ``"torch"``): ``"ms"`` on the example input, or
            ``"dropped"`` with the reason (export failed, outputs differ, raised). Choices for other
            signatures: ``RuntimeModel.choices``.
    """

    backend: str
    entries: list[ReportEntry] = field(default_factory=list)
    fallback_reason: Optional[str] = None
    checks: list[str] = field(default_factory=list)
    kernels: dict[str, dict] = field(default_factory=dict)
    cuda_graphs: dict[tuple, str] = field(default_factory=dict)
    runtimes: dict[str, dict] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"accelerate: backend={self.backend}" + (f" (fallback: {self.fallback_reason})"
                                                          if self.fallback_reason else "")]
        counts = {a: sum(e.action == a for e in self.entries) for a in ("replaced", "folded", "fused", "left")}
        lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
        lines += [f"  check: {c}" for c in self.checks]
        lines += [f"  {e.action:<8} {e.name}: {e.detail}" for e in self.entries]
        for name, k in self.kernels.items():
            host = k.get("host", {})
            times = ", ".join(f"{c} {t * 1e6:.1f} us" + (f" (host {host[c] * 1e6:.1f} us)" if c in host else "")
                              for c, t in k.get("timings", {}).items())
            dropped = "".join(f"; dropped {c}: {why}" for c, why in k.get("dropped", {}).items())
            lines.append(f"  kernel   {name}: {k['name']} ({times}){dropped}")
        lines += [f"  graph    {key[1][0] if len(key) > 1 else key}: {status}"
                  for key, status in self.cuda_graphs.items()]
        for name, r in self.runtimes.items():
            what = f"{r['ms']:.2f} ms on the example input" if "ms" in r else f"dropped: {r.get('dropped')}"
            lines.append(f"  runtime  {name}: {what}" + (" (chosen)" if name == self.backend else ""))
        return "\n".join(lines)

    def replaced(self) -> list[str]:
        return [e.name for e in self.entries if e.action == "replaced"]

    def left(self) -> dict[str, str]:
        """``{name: reason}`` of everything left as it was."""
        return {e.name: e.detail for e in self.entries if e.action == "left"}


def _resolve_backend(backend: str, device: torch.device, config: AccelerateConfig
                     ) -> tuple[str, list[str], Optional[str]]:
    """``(module backend, CPU runtimes to try, fallback reason)``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", [], None
    if backend in RUNTIMES:
        if device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs CPU models; the model is on {device}")
        ok, why = runtime_available(backend)
        if not ok:
            raise RuntimeError(f"backend={backend!r}: {why}")
        return "torch", [backend], None
    if backend == "auto" and device.type == "cpu":
        unknown = [r for r in config.cpu_runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"config.cpu_runtimes: unknown runtime(s) {unknown}; known: {tuple(RUNTIMES)}")
        found = [r for r in config.cpu_runtimes if runtime_available(r)[0]]
        if config.cpu_runtimes and not found:
            reason = (f"no CPU runtime installed ({', '.join(config.cpu_runtimes)}); "
                      "pip install 'deprune-plugin[cpu]' for OpenVINO and ONNX Runtime")
            warnings.warn(f"deprune_plugin.accelerate: using the torch backend ({reason})", stacklevel=3)
            return "torch", [], reason
        return "torch", found, None
    from ..kernels.cupy_launch import cupy_available
    ok, why = cupy_available()
    reason = None if ok else why
    if ok and not torch.cuda.is_available():
        ok, reason = False, "no CUDA GPU"
    if backend == "cupy" and not ok:
        raise RuntimeError(f"backend='cupy' needs CuPy and a CUDA GPU: {reason}")
    if not ok:
        warnings.warn(f"deprune_plugin.accelerate: using the torch backend ({reason})", stacklevel=3)
        return "torch", [], reason
    return "cupy", [], None


def _default_inputs(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    size = 64
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        channels = cfg["input_size"][0]
    g = torch.Generator(device="cpu").manual_seed(0)  # random, not zeros: a zero image hides wrong layers
    return (torch.randn(1, channels, size, size, generator=g).to(device=device, dtype=dtype),)


def _check_uniform(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if not tensors:
        raise ValueError("model has no floating-point parameters")
    devices = {t.device for t in tensors}
    dtypes = {t.dtype for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"model parameters are on several devices: {sorted(map(str, devices))}")
    if len(dtypes) > 1:
        raise ValueError(f"model parameters have several dtypes: {sorted(map(str, dtypes))}")
    return devices.pop(), dtypes.pop()


@torch.no_grad()
def accelerate(model: nn.Module, backend: str = "auto", example_inputs: tuple | torch.Tensor | None = None,
               config: AccelerateConfig | None = None,
               filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Return an inference copy of ``model`` whose depth-wise convs run on fast kernels.

    BatchNorm is folded into the preceding conv, the activation after a DW conv (ReLU, ReLU6, SiLU,
    Hardswish, GELU, identity) is fused into its epilogue, and every DW conv (pruned or not) becomes a
    :class:`FastDWConv` holding its kept taps compacted. Folding and fusion follow the model's data flow:
    a BatchNorm or activation whose input is also read elsewhere is left alone (see :mod:`.fold`).

    The result is checked before it is returned: its output on ``example_inputs`` (and on a second input of
    another batch and spatial size, when the model accepts one) must match ``model``'s; an edit that breaks
    it is reverted, reported as ``"left: output mismatch ..."``, and warned about once.

    Args:
        model: a model (pruned by DEPruner or not). Not modified.
        backend: ``"auto"``: on CUDA the CuPy kernels when CuPy imports; on a CPU the fastest of the
            installed CPU runtimes (``config.cpu_runtimes``) and the torch path, each checked, chosen per
            input signature by timing on first use (the example input's now); else torch, with one
            warning. ``"cupy"``: error without CuPy + GPU. ``"torch"``: dense conv on masked weights,
            channels_last, BN folded, eager. ``"openvino"`` / ``"onnxruntime"``: CPU; error when not
            installed; falls back to torch with one warning when its output differs.
        example_inputs: an input to trace and check with; default a ``[1, C, 64, 64]`` random image (seeded).
        config: :class:`AccelerateConfig`.
        filter_fn: ``filter_fn(module, name) -> bool``; DW convs it rejects are left as they are.

    Returns:
        The accelerated model (eval mode, parameters not requiring grad) with attribute ``deprune_report``
        (:class:`AccelerateReport`).

    Raises:
        TypeError / ValueError naming the argument (before anything is built).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is None:
        config = AccelerateConfig()
    elif not isinstance(config, AccelerateConfig):
        raise TypeError(f"config must be an AccelerateConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {type(filter_fn).__name__}")
    if not isinstance(config.select_reps, int) or config.select_reps < 1:
        raise ValueError(f"config.select_reps must be an int >= 1, got {config.select_reps!r}")
    device, dtype = _check_uniform(model)
    requested = backend
    backend, runtimes, fallback = _resolve_backend(backend, device, config)
    if example_inputs is None:
        example_inputs = _default_inputs(model, device, dtype)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                        f"got {type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and (t.device != device or t.dtype != dtype):
            raise ValueError(f"example_inputs are {t.device}/{t.dtype} but the model is {device}/{dtype}")

    fast = copy.deepcopy(model).eval().requires_grad_(False)  # an inference model: no autograd bookkeeping
    if config.channels_last:
        fast.register_forward_pre_hook(_to_channels_last)
    report = AccelerateReport(backend=backend, fallback_reason=fallback)
    try:
        trace = trace_calls(fast, example_inputs)
        inputs, notes = check_inputs(fast, example_inputs)
    except Exception as e:  # noqa: BLE001 - the argument's fault, with the cause
        raise ValueError(f"example_inputs do not fit the model: {type(e).__name__}: {e}") from e
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    edits, left = plan_edits(fast, trace, find_chains(trace, convs), backend=backend,
                             fold_batchnorm=config.fold_batchnorm, group_size=config.group_size, tile=config.tile,
                             filter_fn=filter_fn)
    prepare = _to_channels_last_model if config.channels_last else None
    verdict = verify_edits(fast, edits, inputs, prepare)
    report.checks += verdict.checks + notes
    report.entries += [e.entry for e in verdict.kept] + left
    report.entries += [ReportEntry(e.name, "left", why) for e, why in verdict.reverted]
    if verdict.reverted:
        warnings.warn(f"deprune_plugin.accelerate: {len(verdict.reverted)} layer(s) left unaccelerated because "
                      f"their replacement changed the model's output (see deprune_report): "
                      f"{', '.join(e.name for e, _ in verdict.reverted[:5])}", RuntimeWarning, stacklevel=3)
    if backend == "cupy" and config.fuse_pairs and fused_kernel_available():
        _fuse_pairs(fast, example_inputs, inputs, prepare, report)
    report.kernels = kernel_choices(fast)
    if runtimes:
        fast = _choose_cpu_runtime(fast, example_inputs, inputs, runtimes, requested in RUNTIMES, config, report)
    if config.cuda_graphs:
        fast = _with_cuda_graphs(fast, device, report)
    fast.deprune_report = report
    return fast


def _choose_cpu_runtime(fast: nn.Module, example_inputs: tuple, inputs: list, runtimes: list[str], explicit: bool,
                        config: AccelerateConfig, report: AccelerateReport) -> nn.Module:
    """Wrap ``fast`` (the checked torch model) in the CPU runtimes whose outputs match the source model on
    every check input. With ``explicit`` the asked-for runtime runs every call; else a
    :class:`RuntimeModel` chooses the fastest runner (torch included) per input signature, the example
    input's now. Dropped runtimes are reported and warned about once; torch is the fallback."""
    try:
        onnx = to_onnx(fast, example_inputs)
        export_error = ""
    except Exception as e:  # noqa: BLE001 - a model ONNX cannot express stays on the torch path, with the reason
        onnx, export_error = None, f"ONNX export failed: {type(e).__name__}: {e}"
    # one RuntimeModel holds the sessions: each runtime is checked through it, so none is compiled twice
    wrapped = None if onnx is None else RuntimeModel(fast, runtimes, onnx, torch.get_num_threads(),
                                                     select_reps=config.select_reps).eval()
    passed = []
    for name in runtimes:
        try:
            if wrapped is None:
                raise RuntimeError(export_error)
            ok, why = outputs_agree(lambda *a, name=name: wrapped.run_runtime(name, *a), inputs)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot build or run the graph is dropped
            ok, why = False, f"{type(e).__name__}: {e}"
        if ok:
            passed.append(name)
        else:
            report.runtimes[name] = {"dropped": why}
    dropped = {k: v["dropped"] for k, v in report.runtimes.items()}
    if dropped:
        warnings.warn("deprune_plugin.accelerate: CPU runtime(s) not used: "
                      + "; ".join(f"{k}: {v}" for k, v in dropped.items()), RuntimeWarning, stacklevel=4)
    labels = ", ".join(i.label for i in inputs)
    report.checks += [f"{name}: outputs match the source model on {labels}" for name in passed]
    if not passed:
        if explicit:
            report.fallback_reason = f"{runtimes[0]}: {dropped[runtimes[0]]}"
        report.backend = "torch"
        return fast
    wrapped.keep_runtimes(passed)
    if explicit:
        report.backend = passed[0]
        return wrapped
    choice = wrapped.select(*example_inputs)
    for name, t in choice.timings.items():
        report.runtimes[name] = {"ms": t * 1e3}
    for name, why in choice.dropped.items():
        report.runtimes[name] = {"dropped": why}
    report.backend = choice.name
    return wrapped


def _with_cuda_graphs(fast: nn.Module, device: torch.device, report: AccelerateReport) -> nn.Module:
    if device.type != "cuda":
        warnings.warn("deprune_plugin.accelerate: cuda_graphs=True needs a model on a CUDA device; ignored",
                      RuntimeWarning, stacklevel=4)
        report.checks.append(f"cuda_graphs ignored: the model is on {device}")
        return fast
    wrapped = CUDAGraphModel(fast)
    report.cuda_graphs = wrapped.status  # the same dict: filled as signatures are captured
    return wrapped


def _fuse_pairs(fast: nn.Module, example_inputs: tuple, inputs: list, prepare, report: AccelerateReport) -> None:
    edits, unfused = plan_pair_edits(fast, example_inputs)
    verdict = verify_edits(fast, edits, inputs, prepare)
    report.checks += [f"DW+PW pairs: {c}" for c in verdict.checks]
    report.entries += [e.entry for e in verdict.kept] + unfused
    report.entries += [ReportEntry(e.name, "unfused", why) for e, why in verdict.reverted]
    blocks = plan_residual_edits(fast, example_inputs) if verdict.kept else []
    if not blocks:
        return
    residual = verify_edits(fast, blocks, inputs, prepare)
    report.checks += [f"residual adds: {c}" for c in residual.checks]
    report.entries += [e.entry for e in residual.kept]
    report.entries += [ReportEntry(e.name, "unfused", f"residual add: {why}") for e, why in residual.reverted]


def kernel_choices(model: nn.Module) -> dict[str, dict]:
    """Per :class:`FastDWConv` of ``model`` that ran its kernels: the choice made for each input signature
    so far (kernel, device/host time per candidate, dropped candidates and why)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (FastDWConv, FusedDSConv)) and m._dispatcher is not None:
            for key, choice in m._dispatcher.cache.items():
                out[name if len(m._dispatcher.cache) == 1 else f"{name} {key[0]}"] = choice.as_dict()
    return out


def _to_channels_last_model(model: nn.Module) -> None:
    model.to(memory_format=torch.channels_last)


def _to_channels_last(module: nn.Module, args: tuple):
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)
