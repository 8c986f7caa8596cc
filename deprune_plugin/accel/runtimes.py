"""CPU inference runtimes behind :func:`~deprune_plugin.accelerate`: OpenVINO and ONNX Runtime.

On a CPU the fastest way to run a pruned depth-wise-separable CNN is not eager PyTorch but an inference
engine that fuses conv + bias + activation and schedules NHWC depth-wise convs well. A runtime here takes
the BN-folded, mask-free torch model that ``accelerate`` builds, exports it once to ONNX (dynamic batch and
spatial size) and wraps the compiled result in :class:`RuntimeModel`, a module with the same call signature
that takes and returns torch tensors.

- ``"openvino"``: the ONNX graph read by OpenVINO and compiled for the CPU **per input shape** (a static
  shape lets OpenVINO pick its blocked NHWC kernels; measured on MobileNetV2, 2 cores: 2.7 ms static vs
  3.3 ms with dynamic shapes), fp32 inference precision forced (some CPUs default to bf16).
- ``"onnxruntime"``: one session with dynamic axes, thread spinning off (so runners do not steal each
  other's cores), all graph optimizations on.

Both run fp32; another input dtype is cast to fp32 and the output cast back. Gradients, tracing, ONNX
export and ``torch.compile`` use the eager torch model (:attr:`RuntimeModel.eager`).

Which runner is fastest depends on the input's shape (measured on MobileNetV2, 2 cores: OpenVINO at batch 1,
ONNX Runtime at batch 32), so a :class:`RuntimeModel` holding several runtimes chooses **per input
signature**, on first use, with the same checked measurement as the CUDA kernels
(:class:`~deprune_plugin.kernels.dispatch.KernelDispatcher`): every runtime's output is compared with the
eager torch model's (dtype-aware tolerance), one that disagrees or raises is dropped with a warning, and the
fastest of the rest (torch included) runs that signature from then on (:attr:`RuntimeModel.choices`).
"""
from __future__ import annotations

import copy
import importlib
import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..kernels.dispatch import Choice, KernelDispatcher, dispatch_key
from .selfcheck import SLACK_FACTOR, rounding_error

__all__ = ["RUNTIMES", "RuntimeModel", "runtime_available", "to_onnx"]

_MAX_COMPILED_SHAPES = 8  # OpenVINO: compiled models kept per input shape (least recently used dropped)


@dataclass(frozen=True)
class _Runtime:
    """One CPU runtime: the package it needs and how to build a session from a model (ONNX bytes, or the
    path of a file the runtime reads: ``.onnx``, or OpenVINO's ``.xml``)."""

    name: str
    package: str  # import name
    pip: str  # what to install
    build: Callable[[bytes | str, int], "_Session"]


class _Session:
    """``run(arrays) -> list of arrays`` for one compiled model."""

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class _OrtSession(_Session):
    def __init__(self, onnx: bytes | str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.names, arrays)))


class _OpenVinoSession(_Session):
    def __init__(self, onnx: bytes | str, threads: int) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(onnx)  # parsed once; reshaped and compiled per input shape
        self.config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()

    def _compiled(self, shapes: tuple) -> Any:
        got = self.compiled.get(shapes)
        if got is None:
            self.model.reshape({i: list(s) for i, s in enumerate(shapes)})  # compiled models keep their shape
            got = self.compiled[shapes] = self.core.compile_model(self.model, "CPU", self.config)
            if len(self.compiled) > _MAX_COMPILED_SHAPES:
                self.compiled.popitem(last=False)
        else:
            self.compiled.move_to_end(shapes)
        return got

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        compiled = self._compiled(tuple(a.shape for a in arrays))
        result = compiled(list(arrays))
        return [result[o] for o in compiled.outputs]


#: name -> runtime, in the order ``backend="auto"`` tries them on a CPU.
RUNTIMES: dict[str, _Runtime] = {
    "openvino": _Runtime("openvino", "openvino", "openvino", _OpenVinoSession),
    "onnxruntime": _Runtime("onnxruntime", "onnxruntime", "onnxruntime", _OrtSession),
}


def runtime_available(name: str) -> tuple[bool, str]:
    """``(True, "")`` when runtime ``name`` imports, else ``(False, why)``."""
    rt = RUNTIMES[name]
    try:
        importlib.import_module(rt.package)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with the reason
        return False, f"{rt.package} is not importable ({type(e).__name__}: {e}); pip install {rt.pip}"
    return True, ""


def _dynamic_axes(args: tuple, n_out: int) -> dict[str, dict[int, str]]:
    axes = {}
    for i, a in enumerate(args):
        dims = {0: "batch"}
        if a.dim() == 4:
            dims.update({2: f"height{i}", 3: f"width{i}"})
        axes[f"input{i}"] = dims
    axes.update({f"output{i}": {0: "batch"} for i in range(n_out)})
    return axes


@torch.no_grad()
def to_onnx(model: nn.Module, args: tuple, dynamic: bool = True) -> bytes:
    """Export ``model`` (an inference model: eval mode, no mask hooks) to ONNX and return the bytes.

    Inputs are named ``input0..``, outputs ``output0..``; with ``dynamic`` the batch axis (and the spatial
    axes of 4-D inputs) are dynamic. Uses the TorchScript-based exporter: it traces a CNN in well under a
    second and handles dynamic spatial sizes, while the ``torch.export``-based one (torch 2.14) specialises
    MobileNetV2's batch and spatial sizes (constraint violations). Its deprecation warning is ours to
    handle, not the user's, so it is silenced here.
    """
    out = model(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=[f"input{i}" for i in range(len(args))],
                          output_names=[f"output{i}" for i in range(n_out)],
                          dynamic_axes=_dynamic_axes(args, n_out) if dynamic else None)
    return buf.getvalue()


def _cast_floating(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    return type(out)(_cast_floating(o, dtype) for o in out)


class RuntimeModel(nn.Module):
    """``eager``'s forward run by one or more CPU runtimes (see the module doc).

    Args:
        eager: the torch inference model the ONNX graph was exported from (kept: gradients, tracing,
            export and ``torch.compile`` run it, and it is the reference the runtimes are checked against).
        runtimes: keys of :data:`RUNTIMES`. One: it runs every call. Several: the fastest correct runner
            (``"torch"`` included) is chosen per input signature on first use.
        onnx: the exported graph (:func:`to_onnx`).
        threads: the runtimes' thread count.
        select_reps: timed samples per runner when choosing.

    Shapes: whatever ``eager`` takes and returns (a tensor or a tuple of tensors), any batch and (for 4-D
    inputs) spatial size.
    """

    def __init__(self, eager: nn.Module, runtimes: Sequence[str], onnx: bytes, threads: int,
                 select_reps: int = 5) -> None:
        super().__init__()
        runtimes = (runtimes,) if isinstance(runtimes, str) else tuple(runtimes)
        bad = [r for r in runtimes if r not in RUNTIMES]
        if not runtimes or bad:
            raise ValueError(f"runtime must be one of {tuple(RUNTIMES)}, got {list(runtimes)!r}")
        self.eager = eager
        self.runtimes = runtimes
        self.onnx = onnx
        self.threads = int(threads)
        self.select_reps = int(select_reps)
        self.choices: dict[tuple, str] = {}  # dispatch key -> runner, when several runtimes are held
        # native sessions and the dispatcher are not module state: rebuilt after copies and loads
        self.__dict__["_sessions"] = {}
        self.__dict__["_dispatcher"] = None

    @property
    def runtime(self) -> str:
        """The runtime used when there is one; with several, the one chosen most recently (or the first)."""
        return next(reversed(self.choices.values()), self.runtimes[0]) if len(self.runtimes) > 1 else self.runtimes[0]

    def extra_repr(self) -> str:
        return f"runtimes={self.runtimes}, threads={self.threads}, onnx={len(self.onnx)} bytes"

    def session(self, name: str) -> _Session:
        """The compiled session of runtime ``name`` (built on first use)."""
        sessions = self.__dict__.setdefault("_sessions", {})
        if name not in sessions:
            sessions[name] = RUNTIMES[name].build(self.onnx, self.threads)
        return sessions[name]

    def run_runtime(self, name: str, *args: torch.Tensor) -> Any:
        """One call through runtime ``name`` (fp32 inside; floating outputs in the first input's dtype)."""
        dtype = args[0].dtype
        arrays = [np.ascontiguousarray(a.detach().float().numpy()) for a in args]
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session(name).run(arrays)]
        outs = [o.to(dtype) if o.is_floating_point() and dtype.is_floating_point else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def keep_runtimes(self, names: Sequence[str]) -> None:
        """Keep only runtimes ``names`` (those that passed a check); the others' compiled graphs are freed."""
        self.runtimes = tuple(names)
        sessions = self.__dict__.setdefault("_sessions", {})
        for name in [n for n in sessions if n not in self.runtimes]:
            del sessions[name]
        self.__dict__["_dispatcher"] = None

    def dispatcher(self) -> KernelDispatcher:
        """Per-signature choice among ``"torch"`` (the reference) and the runtimes."""
        if self.__dict__.get("_dispatcher") is None:
            # listed order is the preference: the runtimes as configured (OpenVINO first: fastest or within 2%
            # in every case of the README's table), then torch; a later runner must be >10% faster to win
            runners = {r: (lambda *a, r=r: self.run_runtime(r, *a)) for r in self.runtimes}
            runners["torch"] = lambda *a: self.eager(*a)
            d = KernelDispatcher(runners, reference="torch", warmup=2, reps=self.select_reps, calls_per_sample=1,
                                 label="CPU runtimes", gap_s=0.005, margin=0.1, slack=self._rounding_slack)
            for key, name in self.choices.items():
                d.restore(key, name)
            self.__dict__["_dispatcher"] = d
        return self.__dict__["_dispatcher"]

    def _rounding_slack(self, ref: Any, *args: torch.Tensor) -> float:
        """How far a runtime may be from the torch runner on ``args`` beyond fp32's tolerance:
        ``SLACK_FACTOR`` times the torch model's own distance from its float64 value there (a model with
        BatchNorm variances near 0 amplifies rounding; see :mod:`.selfcheck`). 0 where float64 fails."""
        try:
            with torch.no_grad():
                _, errs = rounding_error(copy.deepcopy(self.eager).double(), args, ref)
        except Exception:  # noqa: BLE001 - no float64 reference: the plain tolerance applies
            return 0.0
        return SLACK_FACTOR * max(errs, default=0.0)

    def select(self, *args: torch.Tensor) -> Choice:
        """Check and time the runners on ``args`` (once per signature) and return the :class:`Choice`."""
        choice = self.dispatcher().select(*args)
        self.choices[self._key(args)] = choice.name
        return choice

    @staticmethod
    def _key(args: tuple) -> tuple:
        return tuple(dispatch_key(a) for a in args)

    def _runs_eagerly(self, args: tuple) -> bool:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return True
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or len(tensors) != len(args) or any(t.device.type != "cpu" for t in tensors):
            return True
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def forward(self, *args: Any) -> Any:
        if self._runs_eagerly(args):
            return self.eager(*args)
        dtype = args[0].dtype
        if dtype.is_floating_point and dtype != torch.float32:
            # every runner is fp32 (the runtimes' graph and the eager model alike): cast in and back out
            args = tuple(a.float() if a.is_floating_point() else a for a in args)
            return _cast_floating(self.forward(*args), dtype)
        if len(self.runtimes) == 1:
            return self.run_runtime(self.runtimes[0], *args)
        name = self.choices.get(self._key(args))
        if name is None:
            name = self.select(*args).name
        return self.eager(*args) if name == "torch" else self.run_runtime(name, *args)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sessions"], state["_dispatcher"] = {}, None  # native sessions do not pickle or deepcopy
        return state
