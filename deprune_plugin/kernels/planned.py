"""Per-signature launch plans: a kernel call whose every argument but the input and output pointers is bound.

A launcher (:func:`.dw_direct.dw_direct`, :func:`.dw_dr.dw_dr`) checks its arguments, plans the tile,
specialises the source (hashing it), allocates the output and packs the arguments on every call: tens of
microseconds of Python. For one layer and one input signature all of that is the same every time, so
:func:`plan_call` runs the launcher once with its launch captured (:func:`.launch.capture_launches`) and
keeps what it would have launched as a :class:`PlannedCall`. Calling the plan then costs one output
allocation, two pointer writes and the launch.

The plan is launcher-agnostic: whatever a launcher computes (today's planner or a ``*_plan`` function
returning a :class:`.plan.KernelPlan`), it reaches :func:`.launch.run_kernel` with finished arguments, and
that is what is kept.

A plan is only kept when it is safe to replay: exactly one launch, the input passed as it came (not a copy
the launcher made), and every other pointer argument a tensor the caller promises to keep alive and
unchanged (``keep_alive``: the compact weights and the bias). Otherwise :func:`plan_call` says why and the
caller keeps calling the launcher.

The caller keys plans by the input signature (shape, dtype, device, memory format) *and* the input
pointer's alignment to 16 bytes (:func:`plan_key`), since a launcher may choose a vectorised variant for
aligned pointers; the output is allocated by torch with the same size and strides every call.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch

from . import cupy_launch, emulation
from .launch import CapturedLaunch, capture_launches, run_kernel
from .sources import KernelArg

__all__ = ["PlannedCall", "plan_call", "plan_key"]

_VECTOR_BYTES = 16


def plan_key(x: torch.Tensor) -> tuple[Hashable, ...]:
    """Cache key of a plan for input ``x``: shape, dtype, device, strides and ``data_ptr() % 16``.

    Strides (not a memory-format name) because they are what the plan's output strides follow, and they are
    cheaper to read than ``is_contiguous(memory_format=...)`` tests."""
    return x.shape, x.dtype, x.device, x.stride(), x.data_ptr() % _VECTOR_BYTES


class PlannedCall:
    """One captured launch, replayable on any input of the captured signature.

    Args:
        launch: the launch the launcher asked for.
        x, y: the input it was captured with and the output the launcher allocated.
        keep_alive: tensors whose pointers the launch may hold besides ``x`` and ``y`` (the plan holds
            references to them).
        extra: further per-call inputs (e.g. a residual added in the epilogue), passed to every call after
            ``x`` in this order, with the signature they were captured with.

    Raises:
        ValueError: when the launch holds a pointer that is neither ``x``, ``y`` nor a ``keep_alive`` tensor
            (a temporary the launcher made, which would dangle on a replay).

    Calling it with ``x`` (same signature) returns a new output ``y`` ``[N, C, OH, OW]`` with the launch
    queued (CuPy, on the current torch stream) or run (emulation).
    """

    __slots__ = ("backend", "entry", "src", "grid", "block", "smem", "device", "_x_slot", "_y_slot", "_args",
                 "_size", "_stride", "_dtype", "_keep", "_kernel", "_index", "_packed", "_extra_slots")

    def __init__(self, launch: CapturedLaunch, x: torch.Tensor, y: torch.Tensor,
                 keep_alive: Sequence[torch.Tensor | None], extra: Sequence[torch.Tensor] = ()) -> None:
        keep = [t for t in keep_alive if t is not None]
        known = {int(t.data_ptr()) for t in keep} | {0}
        xp, yp = int(x.data_ptr()), int(y.data_ptr())
        wanted = [int(t.data_ptr()) for t in extra]
        extra_slots: list[int | None] = [None] * len(extra)
        x_slot = y_slot = None
        for i, a in enumerate(launch.args):
            if a.kind != "ptr":
                continue
            if a.value == xp and x_slot is None:
                x_slot = i
            elif a.value == yp and y_slot is None:
                y_slot = i
            elif a.value in wanted and extra_slots[wanted.index(a.value)] is None:
                extra_slots[wanted.index(a.value)] = i
            elif a.value not in known:
                raise ValueError(f"argument {i} of {launch.entry} points at a tensor the plan cannot keep alive "
                                 "(a temporary of the launcher)")
        if x_slot is None or y_slot is None or None in extra_slots:
            raise ValueError(f"{launch.entry} was not launched on the inputs and output themselves (the launcher "
                             "copied an input)")
        self._extra_slots = tuple(extra_slots)
        self.backend, self.entry, self.src = launch.backend, launch.entry, launch.src
        self.grid, self.block, self.smem, self.device = launch.grid, launch.block, launch.smem, launch.device
        self._x_slot, self._y_slot = x_slot, y_slot
        self._args = list(launch.args)
        self._size, self._stride, self._dtype = tuple(y.shape), tuple(y.stride()), y.dtype
        self._keep = keep
        self._kernel: Any = None
        self._index = -1
        self._packed: list = []
        if self.backend == "cupy":
            self._prepare_cupy()

    def _prepare_cupy(self) -> None:
        """Compile/load the kernel, opt in to its shared memory and pack the arguments as NumPy scalars, once."""
        import numpy as np  # CuPy depends on NumPy; numpy scalars fix each argument's C type and size

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        cupy = cupy_launch._import_cupy()
        kernel = cupy_launch._kernel(self.src, self.entry, index)
        with cupy.cuda.Device(index):
            if self.smem > cupy_launch.DEFAULT_SMEM_LIMIT:
                limit = cupy_launch.max_dynamic_smem(index)
                if self.smem > limit:
                    raise ValueError(f"{self.entry} asks for {self.smem} bytes of dynamic shared memory; device "
                                     f"{index} allows {limit}")
                if kernel.max_dynamic_shared_size_bytes < self.smem:
                    kernel.max_dynamic_shared_size_bytes = int(self.smem)
        conv = {"ptr": np.uint64, "i32": np.int32, "f32": np.float32}
        self._packed = [conv[a.kind](a.value) for a in self._args]
        self._kernel, self._index = kernel, index

    def __call__(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        y = torch.empty_strided(self._size, self._stride, dtype=self._dtype, device=x.device)
        if self._kernel is not None:
            import numpy as np  # already imported by _prepare_cupy; a sys.modules lookup here

            args = self._packed.copy()
            args[self._x_slot] = np.uint64(x.data_ptr())
            args[self._y_slot] = np.uint64(y.data_ptr())
            for slot, t in zip(self._extra_slots, extra):
                args[slot] = np.uint64(t.data_ptr())
            cupy = cupy_launch._import_cupy()
            with cupy.cuda.Device(self._index), cupy_launch._external_stream(self._index):
                self._kernel(self.grid, self.block, tuple(args), shared_mem=self.smem)
            return y
        args = self._args.copy()
        args[self._x_slot] = KernelArg("ptr", x.data_ptr())
        args[self._y_slot] = KernelArg("ptr", y.data_ptr())
        for slot, t in zip(self._extra_slots, extra):
            args[slot] = KernelArg("ptr", t.data_ptr())
        emulation.launch(self.src, self.entry, self.grid, self.block, self.smem, args)  # read per call: stubbable
        return y

    def __repr__(self) -> str:
        return (f"PlannedCall({self.entry}, backend={self.backend}, grid={self.grid}, block={self.block}, "
                f"smem={self.smem}, out={self._size})")


def plan_call(launcher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              keep_alive: Sequence[torch.Tensor | None], extra: Sequence[torch.Tensor] = ()
              ) -> tuple[PlannedCall | None, torch.Tensor, str]:
    """Run ``launcher(x)`` once with its launch captured, and return ``(plan, y, reason)``. ``extra``: further
    inputs ``launcher`` passes to the kernel (the plan takes them per call, see :class:`PlannedCall`).

    ``y`` is ``launcher(x)``'s result, computed: the captured launch is run for real here. ``plan`` is the
    :class:`PlannedCall` to reuse for inputs of ``x``'s :func:`plan_key`, or None (then ``reason`` says why
    and the caller should call the launcher each time: correct, just slower).
    """
    with capture_launches() as launches:
        y = launcher(x)
    if not launches:  # nothing to launch (an empty batch): the launcher's output is the result
        return None, y, "the launcher launched nothing"
    if len(launches) > 1:
        return None, launcher(x), f"the launcher made {len(launches)} launches"
    launch = launches[0]
    try:
        plan = PlannedCall(launch, x, y, keep_alive, extra)
    except ValueError as e:
        return None, launcher(x), str(e)  # temporaries of the capture are gone: run it again, for real
    run_kernel(launch.backend, launch.src, launch.entry, launch.grid, launch.block, launch.smem, launch.args,
               launch.device)
    return plan, y, ""
