"""The inference module that replaces a depth-wise conv (+ folded BN + activation)."""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.padding import same_padding
from ..kernels.activations import ACTIVATIONS, apply_activation
from ..kernels.dispatch import KernelDispatcher, dispatch_key
from ..kernels.formats import CompactTaps, DRColumns
from ..kernels.planned import plan_call, plan_key

__all__ = ["FastDWConv", "MODULE_BACKENDS"]

#: What a FastDWConv runs: ``"torch"`` (dense conv on the masked weight), ``"cupy"`` (CUDA kernels on CUDA
#: inputs, chosen per signature), ``"emu"`` (the kernels' host emulation on CPU inputs: slow, for tests).
MODULE_BACKENDS = ("torch", "cupy", "emu")
_FORMATS = {"taps": CompactTaps, "dr": DRColumns}
# Guards the lazy creation of a layer's dispatcher: two threads' first calls must share one dispatcher (and
# so one selection per signature), not each build and time their own.
DISPATCHER_LOCK = threading.Lock()


def _store_format(module: nn.Module, prefix: str, fmt: Any) -> dict[str, Any]:
    """Register every tensor field of a format dataclass as a buffer (float fields as int32 bit patterns,
    so dtype casts of the module never round them); return the non-tensor fields."""
    static: dict[str, Any] = {}
    floats = []
    for f in dataclasses.fields(fmt):
        value = getattr(fmt, f.name)
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.float32:
                value = value.view(torch.int32)
                floats.append(f.name)
            module.register_buffer(f"{prefix}_{f.name}", value.detach().clone())
        else:
            static[f.name] = value
    return {"static": static, "floats": floats}


def _load_format(module: nn.Module, prefix: str, cls: type, stored: dict[str, Any], validate: bool = True) -> Any:
    """The format ``cls`` over ``module``'s buffers ``<prefix>_<field>``. ``validate=False`` skips the
    content checks (device syncs) for buffers known to copy already validated ones."""
    kwargs = dict(stored["static"])
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            t = getattr(module, f"{prefix}_{f.name}")
            kwargs[f.name] = t.view(torch.float32) if f.name in stored["floats"] else t
    if validate:
        return cls(**kwargs)
    fmt = cls.__new__(cls)
    for name, value in kwargs.items():
        object.__setattr__(fmt, name, value)
    return fmt


_CHOICES_KEY = "kernel_choices"
_CHOICE_COLS = 9
_KERNELS = ("dense", "direct", "dr")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LAYOUTS = ("contiguous", "channels_last", "strided")


def _encode_choice(key: tuple, name: str, names: tuple[str, ...] = _KERNELS) -> list[int]:
    """``dispatch_key`` + kernel name -> ``[n, c, h, w, dtype, layout, device type, device index, kernel]``
    (``kernel``: the name's index in ``names``)."""
    shape, dtype, device, layout = key
    dev = torch.device(device)
    return [*shape, _DTYPES.index(dtype), _LAYOUTS.index(layout), int(dev.type == "cuda"),
            -1 if dev.index is None else dev.index, names.index(name)]


def _decode_choice(row: list[int], names: tuple[str, ...] = _KERNELS) -> tuple[tuple, str]:
    n, c, h, w, dtype, layout, is_cuda, index, kernel = row
    device = torch.device("cuda" if is_cuda else "cpu", None if index < 0 else index)
    return ((n, c, h, w), _DTYPES[dtype], device, _LAYOUTS[layout]), names[kernel]


def encode_choices(choices: dict, names: tuple[str, ...]) -> torch.Tensor:
    """Per-signature choices as one int64 tensor (a row per signature, see :func:`_encode_choice`): what a
    state dict holds (a dict entry would break ``torch.jit.trace``, which detaches every state-dict value)."""
    rows = [_encode_choice(k, v, names) for k, v in choices.items()]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _CHOICE_COLS)


def decode_choices(rows: torch.Tensor, names: tuple[str, ...]) -> dict:
    """The inverse of :func:`encode_choices`."""
    return dict(_decode_choice(r, names) for r in rows.tolist())


def _dense(x: torch.Tensor, mod: "FastDWConv") -> torch.Tensor:
    return mod.dense(x)


def _kernel(name: str):
    def run(x: torch.Tensor, mod: "FastDWConv") -> torch.Tensor:
        return mod.run_kernel(name, x)
    run.__name__ = f"_{name}"
    return run


class FastDWConv(nn.Module):
    """Depth-wise conv with BN folded and the activation fused, holding its kept taps compacted.

    Args:
        weight: folded, masked DW weight ``[C, 1, kh, kw]`` (pruned taps exactly 0).
        bias: folded bias ``[C]``.
        keep: bool keep mask ``[C, 1, kh, kw]``.
        stride, dilation: as in the original conv.
        padding: ``(top, bottom, left, right)`` zero padding, or ``"same"`` for TensorFlow-style padding
            computed per input size (timm ``Conv2dSame``).
        act: epilogue activation (a key of :data:`deprune_plugin.kernels.ACTIVATIONS`).
        backend: one of :data:`MODULE_BACKENDS`.
        group_size, tile: DR balanced range and K tile.
        label: the layer's name in the model (for warnings and reports).

    Everything the kernels need is a buffer (the compact formats' float values as int32 bit patterns), so
    ``.to()``, ``.half()``, ``meta``, ``deepcopy``, ``state_dict`` and DataParallel replicas carry it.
    Kernel choices per input signature (:attr:`choices`) are plain data kept in the state dict, so a
    reloaded model does not re-time known signatures.

    Host path: the first call of an input signature (shape, dtype, device, strides, pointer alignment)
    chooses the kernel (unless known) and captures the launcher's launch as a plan
    (:mod:`deprune_plugin.kernels.planned`); later calls of the signature run the plan: one output allocation
    and one launch, no argument checks, tile planning, source specialisation or bias cast. Plans are dropped
    on every move, dtype change or state-dict load, and are never copied.

    Shapes: input ``[N, C, H, W]`` -> output ``[N, C, Ho, Wo]``. An input that requires grad (with grad
    enabled) takes the dense path, so gradients flow through the layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int] | str, dilation: Sequence[int], act: str, backend: str = "torch",
                 group_size: int = 32, tile: int = 32, label: str = "") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if backend not in MODULE_BACKENDS:
            raise ValueError(f"backend must be one of {MODULE_BACKENDS}, got {backend!r}")
        if padding != "same" and (isinstance(padding, str) or len(tuple(padding)) != 4):
            raise ValueError(f"padding must be (top, bottom, left, right) or 'same', got {padding!r}")
        self.register_buffer("weight", weight.detach().clone().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("keep", keep.detach().to(torch.bool).clone())
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = "same" if padding == "same" else tuple(int(p) for p in padding)
        self.groups = weight.shape[0]
        self.act = act
        self.backend = backend
        self.group_size, self.tile = group_size, tile
        self.label = label
        w32, keep32 = self.weight.float(), self.keep
        self._static = {
            "taps": _store_format(self, "taps", CompactTaps.from_dense(w32, keep32)),
            "dr": _store_format(self, "dr", DRColumns.from_dense(w32, keep32, group_size=group_size, tile=tile)),
        }
        self._formats: dict[str, Any] = {}
        self._generation, self._formats_gen = 0, -1
        self.choices: dict[tuple, str] = {}  # dispatch_key -> candidate name, kept across copies and saves
        self._dispatcher: KernelDispatcher | None = None
        # plan_key(x) -> (dispatch_key, kernel name, callable, backend): the launch plan of each input signature
        # seen, valid while choices[dispatch_key] and the backend are unchanged (see forward); dropped on every
        # move or load.
        self._calls: dict[tuple, tuple[tuple, str, Any, str]] = {}
        self.plan_notes: dict[str, str] = {}  # kernel -> why its calls could not be planned (if ever)

    def extra_repr(self) -> str:
        return (f"{self.groups}, kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"kept_taps={int(self.keep.sum())}/{self.keep.numel()}, act={self.act}, backend={self.backend}")

    # ---- geometry --------------------------------------------------------------------------------
    def pads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` zero padding for input ``x``."""
        if self.padding != "same":
            return self.padding
        kh, kw = self.kernel_size
        top, bottom = same_padding(x.shape[-2], kh, self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], kw, self.stride[1], self.dilation[1])
        return top, bottom, left, right

    # ---- the paths -------------------------------------------------------------------------------
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: dense conv on the masked weight, then the activation."""
        top, bottom, left, right = self.pads(x)
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if top == bottom and left == right:
            y = F.conv2d(x, w, b, self.stride, (top, left), self.dilation, self.groups)
        else:
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, self.stride, 0, self.dilation, self.groups)
        return apply_activation(self.act, y)

    def formats(self) -> dict[str, Any]:
        """The compact formats (:class:`CompactTaps` ``"taps"``, :class:`DRColumns` ``"dr"``) and the fp32
        ``"bias"`` on the buffers' current device, rebuilt (and validated once) after a move or a load.

        Cached per generation: :meth:`_apply` (``.to``, ``.cuda``, ``.half``, ...) and state-dict loads start
        a new one, a DataParallel replica starts empty (:meth:`_replicate_for_data_parallel`); a call costs an
        integer comparison. (Writing the buffers by hand is not noticed.)"""
        if self._formats_gen != self._generation:
            validate = not self.__dict__.pop("_buffers_validated", False)
            self._formats = {name: _load_format(self, name, cls, self._static[name], validate)
                             for name, cls in _FORMATS.items()}
            self._formats["bias"] = self.bias.float().contiguous()  # once, not a cast launch per call
            self._formats_gen = self._generation
        return self._formats

    def _apply(self, fn, recurse: bool = True):
        self._generation += 1
        self._calls = {}  # plans hold pointers to the old buffers
        return super()._apply(fn, recurse)

    def _replicate_for_data_parallel(self):
        """A ``nn.DataParallel`` replica (``torch.nn.parallel.replicate``): a shallow copy whose buffers
        ``replicate`` then swaps for copies on the replica's device, never through :meth:`_apply`. The
        replica drops the cached formats (they hold this module's tensors) and rebuilds them from its own
        buffers on first use, without the content checks: its buffers are copies of this module's, checked
        here. The kernel choices stay shared (their keys carry the device), so the replicas that DataParallel
        makes anew on every forward do not re-time known signatures."""
        replica = super()._replicate_for_data_parallel()
        replica._formats, replica._formats_gen = {}, -1
        replica._calls = {}  # this module's plans point at this module's buffers
        if not self.keep.is_meta:  # (meta tensors have no content to check)
            self.formats()  # check (once per generation) the buffers the replicas copy
            replica._buffers_validated = True
        return replica

    def run_kernel(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One kernel (``"direct"`` or ``"dr"``) on ``x`` through the module's kernel backend."""
        from ..kernels import dw_direct, dw_dr

        backend = "emu" if self.backend == "emu" else "cupy"
        fmt = self.formats()
        conv = dict(stride=self.stride, padding=self.pads(x), dilation=self.dilation, act=self.act, backend=backend)
        if name == "direct":
            return dw_direct(x, fmt["taps"], fmt["bias"], **conv)
        if name == "dr":
            return dw_dr(x, fmt["dr"], fmt["bias"], **conv)
        raise ValueError(f"unknown kernel {name!r}")

    def _kernel_tensors(self, name: str) -> list[torch.Tensor]:
        """The tensors a launch of kernel ``name`` points at besides its input and output (what a plan keeps)."""
        fmt = self.formats()
        weights = fmt["taps"] if name == "direct" else fmt["dr"]
        return [getattr(weights, f.name) for f in dataclasses.fields(weights)
                if isinstance(getattr(weights, f.name), torch.Tensor)] + [fmt["bias"]]

    def dispatcher(self) -> KernelDispatcher:
        """The layer's :class:`KernelDispatcher` over dense / direct / DR (built on first use)."""
        with DISPATCHER_LOCK:
            if self._dispatcher is None:
                d = KernelDispatcher({"dense": _dense, "direct": _kernel("direct"), "dr": _kernel("dr")},
                                     label=self.label)
                for key, name in self.choices.items():
                    d.restore(key, name)
                self._dispatcher = d
        return self._dispatcher

    def _uses_kernels(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the kernels have no backward: the dense path keeps gradients flowing
        if self.backend == "cupy":
            return x.is_cuda
        return self.backend == "emu" and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        # The hot path: a known signature (its key holds the device) whose choice and backend have not changed
        # runs its plan (one allocation, one launch). choices and backend may be edited from outside (restored,
        # set by hand), hence the checks; an input that needs gradients never runs a kernel.
        hit = self._calls.get(plan_key(x))
        if (hit is not None and hit[3] == self.backend and self.choices.get(hit[0]) == hit[1]
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.jit.is_tracing()):
            return hit[2](x)
        if not self._uses_kernels(x) or torch.jit.is_tracing():
            return self.dense(x)
        return self._first_call(x)

    def _first_call(self, x: torch.Tensor) -> torch.Tensor:
        """First call of a signature: choose the kernel (unless a choice is known: ahead of time in
        ``accelerate()``, or restored from a state dict), then plan its launch and keep the plan."""
        key = dispatch_key(x)
        name = self.choices.get(key)
        if name is None:  # first call with this signature: check and time the candidates
            name = self.choices[key] = self.dispatcher().select(x, self).name
        if name == "dense":
            self._calls[plan_key(x)] = (key, name, self.dense, self.backend)
            return self.dense(x)
        plan, y, why = plan_call(lambda t: self.run_kernel(name, t), x, self._kernel_tensors(name))
        if plan is None:
            self.plan_notes[name] = why
            call = functools.partial(self.run_kernel, name)
        else:
            call = plan
        self._calls[plan_key(x)] = (key, name, call, self.backend)
        return y

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under torch.compile / torch.export: the kernel chosen ahead of time for this signature (see
        :attr:`choices`; none known -> dense) as a ``torch.ops.deprune`` custom op, one graph node."""
        name = self.choices.get(dispatch_key(x), "dense") if self._uses_kernels(x) else "dense"
        if name == "dense":
            return self.dense(x)
        from ..kernels import ops  # noqa: F401 - registers torch.ops.deprune

        conv = (list(self.stride), list(self.pads(x)), list(self.dilation), self.act)
        bias = self.bias  # as stored: the op casts a non-fp32 bias once (a cast here would be a launch per call)
        if name == "direct":
            return torch.ops.deprune.dw_direct(x, self.taps_tap_ptr, self.taps_tap_idx,
                                               self.taps_tap_val.view(torch.float32), bias,
                                               list(self.kernel_size), *conv)
        return torch.ops.deprune.dw_dr(x, self.dr_col_ptr, self.dr_col_chan, self.dr_col_tap,
                                       self.dr_col_val.view(torch.float32), self.dr_col_kept, bias,
                                       list(self.kernel_size), self.group_size, self.tile, *conv)

    # ---- persistence -----------------------------------------------------------------------------
    # Kernel choices travel in the state dict as one int64 tensor (a dict entry would break torch.jit.trace,
    # which detaches every state-dict value): a row per signature, see _encode_choice.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _CHOICES_KEY] = encode_choices(self.choices, _KERNELS)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        rows = state_dict.pop(prefix + _CHOICES_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._generation += 1  # buffers were overwritten in place
        self.__dict__.pop("_buffers_validated", None)  # with content that was never checked
        if rows is not None:
            state_dict[prefix + _CHOICES_KEY] = rows  # leave the caller's dict as it was
            self.choices = decode_choices(rows, _KERNELS)
            self._dispatcher = None
        self._calls = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_dispatcher"] = None  # holds compiled kernels and a lock: rebuilt on first use
        state["_formats"], state["_formats_gen"] = {}, -1
        state["_calls"] = {}  # plans point at this module's buffers, not the copy's
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_calls", {})  # modules pickled before plans existed
        self.__dict__.setdefault("plan_notes", {})
