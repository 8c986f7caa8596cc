"""Kernel cases of ``deprune gpu-check``: one DW conv (or DW + 1x1 pair) as tensors, the project's launchers
on it, the cuDNN (eager PyTorch) form of the same layer and its float32 reference.

Run as a module it launches small cases, one per kernel and dtype, through the project's launchers and
checks each against the float32 reference; ``deprune gpu-check`` runs it under ``compute-sanitizer`` (GPU)
or the host emulation's ASan/UBSan build (``--backend emu``, in a process started with
:func:`deprune_plugin.kernels.emulation.sanitizer_env`)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m deprune_plugin.app.gpu_check_cases \\
        --kernel direct --dtype float16

Each case prints one line ``case <kernel> <dtype>: ok|FAILED ...``; the exit status is 1 when a case fails
or raises (the other cases still run), 0 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels import CompactTaps, DRColumns, dw_direct, dw_dr, dw_pw_fused
from ..kernels.activations import apply_activation
from ..kernels.launch import ConvGeometry, conv_output_size

__all__ = ["CASE_DTYPES", "CASE_KERNELS", "DWProblem", "case_geometry", "check_output", "cudnn_call", "kernel_calls",
           "logical_bytes", "main", "make_problem", "reference", "run_case", "tolerance"]

#: Kernels with a sanitizer case: the direct and DR DW kernels and the fused DW + 1x1 pair.
CASE_KERNELS = ("direct", "dr", "fused")
CASE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class DWProblem:
    """One DW conv call (``pw is None``) or one DW + 1x1 pair, on one device.

    ``x`` ``[N, C, H, W]`` (channels_last when ``geometry.nhwc``); ``weight`` the masked DW weight
    ``[C, 1, kh, kw]`` float32 and ``keep`` its mask; ``bias`` ``[C]`` float32; ``pw`` ``[CO, C]`` float32,
    ``pw_bias`` ``[CO]`` and ``residual`` ``[N, CO, OH, OW]`` (or None) for a pair."""

    geometry: ConvGeometry
    x: torch.Tensor
    weight: torch.Tensor
    keep: torch.Tensor
    bias: torch.Tensor
    act: str
    pw: torch.Tensor | None = None
    pw_bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    @property
    def conv(self) -> dict:
        """``stride``, ``padding`` (top, bottom, left, right), ``dilation`` as the launchers take them."""
        g = self.geometry
        return {"stride": (g.sh, g.sw), "padding": g.pad, "dilation": (g.dh, g.dw)}


def make_problem(geometry: ConvGeometry, keep: torch.Tensor, act: str = "identity", pw_out: int = 0,
                 residual: bool = False, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 seed: int = 0) -> DWProblem:
    """Random tensors (seeded, made on the CPU, then moved) of the layer ``geometry`` with mask ``keep``
    (``[C, 1, kh, kw]`` bool); with ``pw_out`` > 0 a DW + 1x1 pair of ``pw_out`` outputs (and a residual)."""
    g = geometry
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if g.nhwc else torch.contiguous_format
    x = torch.randn(g.n, g.c, g.h, g.w, generator=gen).to(dtype).contiguous(memory_format=fmt)
    keep = keep.detach().to(torch.bool).cpu().reshape(g.c, 1, g.kh, g.kw)
    weight = torch.randn(g.c, 1, g.kh, g.kw, generator=gen) / max(g.kh, g.kw) * keep
    bias = torch.randn(g.c, generator=gen) * 0.1
    pw = pw_bias = res = None
    if pw_out:
        pw = torch.randn(pw_out, g.c, generator=gen) / g.c ** 0.5
        pw_bias = torch.randn(pw_out, generator=gen) * 0.1
        if residual:
            res = torch.randn(g.n, pw_out, g.oh, g.ow, generator=gen).to(dtype).contiguous(
                memory_format=torch.channels_last)
    dev = torch.device(device)

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev)

    return DWProblem(g, x.to(dev), weight.to(dev), keep.to(dev), bias.to(dev), act, move(pw), move(pw_bias),
                     move(res))


def case_geometry(kernel: str, nhwc: bool = True) -> tuple[ConvGeometry, int, bool, str]:
    """The small sanitizer case of ``kernel``: ``(geometry, 1x1 outputs, residual, act)``. Spatial sizes that
    no tile divides, several CTAs per image, two images; the DR case has two balanced ranges (64 channels),
    the pair an output count (20) that is not a multiple of the output block."""
    if kernel == "direct":
        n, c, h, w, k, s, act, co, res = 2, 48, 13, 11, 3, 1, "relu6", 0, False
    elif kernel == "dr":
        n, c, h, w, k, s, act, co, res = 2, 64, 9, 10, 5, 2, "silu", 0, False
    elif kernel == "fused":
        n, c, h, w, k, s, act, co, res = 2, 48, 9, 10, 3, 1, "relu6", 20, True
    else:
        raise ValueError(f"kernel must be one of {CASE_KERNELS}, got {kernel!r}")
    p = k // 2
    oh, ow = conv_output_size(h, k, s, p, p, 1), conv_output_size(w, k, s, p, p, 1)
    return ConvGeometry(n, c, h, w, oh, ow, k, k, s, s, (p, p, p, p), 1, 1, nhwc), co, res, act


def kernel_calls(p: DWProblem, backend: str, kernels: Sequence[str] | None = None
                 ) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument launch of each project kernel for ``p`` (weight formats built once, here):
    ``direct`` and ``dr`` for a DW conv, ``fused`` for a pair (``kernels`` picks among them)."""
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    conv = p.conv
    if p.pw is None:
        if kernels is None or "direct" in kernels:
            taps = CompactTaps.from_dense(p.weight, p.keep)
            calls["direct"] = lambda: dw_direct(p.x, taps, p.bias, act=p.act, backend=backend, **conv)
        if kernels is None or "dr" in kernels:
            cols = DRColumns.from_dense(p.weight, p.keep)
            calls["dr"] = lambda: dw_dr(p.x, cols, p.bias, act=p.act, backend=backend, **conv)
    elif kernels is None or "fused" in kernels:
        taps = CompactTaps.from_dense(p.weight, p.keep)
        pw = p.pw.to(p.x.dtype)  # as a FusedDSConv stores it: no cast per call
        calls["fused"] = lambda: dw_pw_fused(p.x, taps, p.bias, pw, p.pw_bias, act=p.act, residual=p.residual,
                                             backend=backend, **conv)
    return calls


def cudnn_call(p: DWProblem) -> Callable[[], torch.Tensor]:
    """The layer as eager PyTorch runs it (cuDNN on a GPU) in ``x``'s dtype and memory format: the DW conv on
    the dense masked weight, the activation, and for a pair the 1x1 conv and the residual add."""
    g = p.geometry
    fmt = torch.channels_last if g.nhwc else torch.contiguous_format
    dtype = p.x.dtype
    w = p.weight.to(dtype).contiguous(memory_format=fmt)
    b = p.bias.to(dtype)
    top, bottom, left, right = g.pad
    symmetric = top == bottom and left == right
    pw = None if p.pw is None else p.pw.to(dtype)[:, :, None, None].contiguous(memory_format=fmt)
    pwb = None if p.pw_bias is None else p.pw_bias.to(dtype)

    def call() -> torch.Tensor:
        x = p.x if symmetric else F.pad(p.x, (left, right, top, bottom))
        y = F.conv2d(x, w, b, (g.sh, g.sw), (top, left) if symmetric else 0, (g.dh, g.dw), g.c)
        y = apply_activation(p.act, y)
        if pw is not None:
            y = F.conv2d(y, pw, pwb)
            if p.residual is not None:
                y = y + p.residual
        return y

    return call


def reference(p: DWProblem) -> torch.Tensor:
    """The float32 value of the layer (TF32 off): the DW conv on the storage values, the activation; for a
    pair the DW result rounded once to ``x``'s dtype (where the unfused pair stores it), then the 1x1 conv
    and the residual in float32."""
    g = p.geometry
    top, bottom, left, right = g.pad
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = F.conv2d(F.pad(p.x.float().contiguous(), (left, right, top, bottom)), p.weight, p.bias, (g.sh, g.sw), 0,
                     (g.dh, g.dw), g.c)
        y = apply_activation(p.act, y)
        if p.pw is None:
            return y
        y = y.to(p.x.dtype).float()
        out = F.conv2d(y, p.pw.to(p.x.dtype).float()[:, :, None, None], p.pw_bias)
    return out if p.residual is None else out + p.residual.float()


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of an output in ``dtype`` against the float32 reference (the cuda tests' tolerances)."""
    return (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)


def check_output(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """``(max |y - ref|, within tolerance)``; a 16-bit ``y`` is compared with ``ref`` rounded to its dtype."""
    rtol, atol = tolerance(y.dtype)
    target = ref if y.dtype == torch.float32 else ref.to(y.dtype).float()
    if tuple(y.shape) != tuple(target.shape):
        return float("inf"), False
    diff = (y.float() - target).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    return err, bool(torch.isfinite(diff).all() and (diff <= atol + rtol * target.abs()).all())


def logical_bytes(p: DWProblem) -> int:
    """Bytes the layer must move at least: input, output, kept DW taps (fp32 values, as the kernels read
    them) and DW bias; for a pair the 1x1 weight (in ``x``'s dtype) and bias and the residual."""
    g = p.geometry
    elem = p.x.element_size()
    out_c = g.c if p.pw is None else int(p.pw.shape[0])
    n = (p.x.numel() + g.n * out_c * g.oh * g.ow) * elem + int(p.keep.sum()) * 4 + g.c * 4
    if p.pw is not None:
        n += p.pw.numel() * elem + out_c * 4
        if p.residual is not None:
            n += p.residual.numel() * elem
    return n


def run_case(kernel: str, dtype: torch.dtype, backend: str, seed: int = 0) -> dict:
    """Launch the small case of ``kernel`` (:func:`case_geometry`) in ``dtype`` through ``backend`` (``"cupy"``
    on the current CUDA device, ``"emu"`` on the CPU) and check it: ``{"kernel", "dtype", "max_abs_err",
    "ok"}``."""
    g, co, res, act = case_geometry(kernel)
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(g.c, 1, g.kh, g.kw, generator=gen) < 0.45
    keep[::7] = False  # some fully pruned channels
    device = torch.device("cuda") if backend == "cupy" else torch.device("cpu")
    p = make_problem(g, keep, act, co, res, dtype, device, seed)
    (call,) = kernel_calls(p, backend, [kernel]).values()
    y = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    err, ok = check_output(y, reference(p))
    return {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "max_abs_err": err, "ok": ok}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen cases; prints one line per case; 1 when one fails or raises."""
    ap = argparse.ArgumentParser(prog="python -m deprune_plugin.app.gpu_check_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="all", choices=[*CASE_KERNELS, "all"])
    ap.add_argument("--dtype", default="all", choices=[*CASE_DTYPES, "all"])
    ap.add_argument("--backend", default="cupy", choices=["cupy", "emu"])
    args = ap.parse_args(argv)
    kernels = CASE_KERNELS if args.kernel == "all" else (args.kernel,)
    dtypes = ("float16", "float32") if args.dtype == "all" else (args.dtype,)
    failed = 0
    for kernel in kernels:
        for name in dtypes:
            try:
                r = run_case(kernel, CASE_DTYPES[name], args.backend)
            except Exception as e:  # noqa: BLE001 - report it and run the other cases
                print(f"case {kernel} {name}: FAILED ({type(e).__name__}: {' '.join(str(e).split())})", flush=True)
                failed += 1
                continue
            failed += not r["ok"]
            print(f"case {kernel} {name}: {'ok' if r['ok'] else 'FAILED'} (max |err| {r['max_abs_err']:.3g})",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
