"""``deprune kernels``: the static performance report of the DW kernels and the fused DW + 1x1 pairs on a pruned
model's DW layers.

Builds the timm model with random weights (nothing is downloaded), prunes it with DEPrune (BH by default, 78%
of the DW taps, 50% of the PW-conv2 filters), records every DW layer's input and output size with one forward
pass (:func:`deprune_plugin.core.probe.probe`, batch 1: the geometry at ``--batch`` differs only in ``n``), finds
the 1x1 conv ``accelerate`` would fuse each DW conv with (and whether its block's residual add joins), and
hands all that to :func:`deprune_plugin.kernels.report.kernel_report`, which compiles and models the kernels
(see its docstring for the model and its assumptions).
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch
import torch.nn as nn

from ..core.masks import is_depthwise, tap_mask
from ..core.probe import probe
from ..core.zoo import build_model, classifier_of
from ..kernels.launch import ConvGeometry, conv_output_size
from ..kernels.report import ARCHS, KERNELS, DWLayer, kernel_report, print_report, save_layers
from ..tp_glue.pruner import VARIANTS, DEPruner

__all__ = ["add_arguments", "dw_layers", "main", "pruned_dw_layers"]


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def fusable_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, dict]:
    """Per DW conv name, what ``accelerate`` would fuse it with: ``{"pw_out", "act", "residual"}`` for a DW
    conv with a 1x1 conv that alone reads its output (the pair planner of :mod:`deprune_plugin.accel.fused`
    on ``accelerate(model, backend="torch")``), ``{"note": reason}`` for one left unfused (e.g. an SE block)."""
    import warnings

    from ..accel import AccelerateConfig, accelerate
    from ..accel.fused import plan_pair_edits, plan_residual_edits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reverted edits: the pair planner reads the result
        fast = accelerate(model, backend="torch", example_inputs=example, config=AccelerateConfig(cpu_runtimes=()))
    edits, unfused = plan_pair_edits(fast, example)
    for e in edits:
        e.apply(fast)
    with_residual = {id(e.swaps[0][1].pair) for e in plan_residual_edits(fast, example)}
    out: dict[str, dict] = {e.name: {"note": e.detail} for e in unfused}
    for e in edits:
        pair = e.swaps[0][1]
        out[e.name] = {"pw_out": int(pair.pw_weight.shape[0]), "act": pair.dw.act,
                       "residual": id(pair) in with_residual}
    return out


def dw_layers(model: nn.Module, image_size: int, batch: int, channels_last: bool = True,
              pairs: bool = True) -> list[DWLayer]:
    """Every depth-wise conv of ``model`` as a :class:`DWLayer` for a ``[batch, C, image_size, image_size]``
    input: geometry from one batch-1 forward pass, keep mask from the tap mask (or the nonzero taps), and
    with ``pairs`` the 1x1 conv each would be fused with (:func:`fusable_pairs`)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    with torch.no_grad():
        rec = probe(model.eval(), (torch.zeros(1, channels, image_size, image_size),))
    names = {m: n for n, m in model.named_modules()}
    fusion = fusable_pairs(model, torch.randn(1, channels, image_size, image_size)) if pairs else {}
    layers = []
    for m in sorted((m for m in rec.in_hw if is_depthwise(m)), key=lambda m: rec.order[m]):
        (h, w), (oh, ow) = rec.in_hw[m], rec.out_hw[m]
        kh, kw = m.kernel_size
        sh, sw = m.stride
        dh, dw = m.dilation
        if isinstance(m.padding, str) or type(m).__name__.endswith("Same"):  # TF "SAME" (timm Conv2dSame)
            top, bottom = _same_pads(h, kh, sh, dh)
            left, right = _same_pads(w, kw, sw, dw)
        else:
            top = bottom = m.padding[0]
            left = right = m.padding[1]
        if (conv_output_size(h, kh, sh, top, bottom, dh), conv_output_size(w, kw, sw, left, right, dw)) != (oh, ow):
            raise ValueError(f"{names[m]}: padding {m.padding!r} does not give the recorded output {oh}x{ow}")
        keep = tap_mask(m)
        keep = (m.weight != 0) if keep is None else keep.to(torch.bool)
        g = ConvGeometry(batch, m.out_channels, h, w, oh, ow, kh, kw, sh, sw, (top, bottom, left, right), dh, dw,
                         channels_last)
        f = fusion.get(names[m], {})
        layers.append(DWLayer(names[m], g, keep.detach().cpu().reshape(m.out_channels, 1, kh, kw),
                              pw_out=f.get("pw_out", 0), act=f.get("act", "identity"),
                              residual=f.get("residual", False), pw_note=f.get("note", "")))
    return layers


def pruned_dw_layers(model_name: str = "mobilenetv2_100", batch: int = 32, image_size: int = 224,
                     dw: float = 0.78, pw: float = 0.0, variant: str = "BH", seed: int = 0,
                     channels_last: bool = True) -> list[DWLayer]:
    """The DW layers of timm ``model_name`` (random init, seeded) after DEPrune-``variant`` at ``dw`` of the
    taps (and ``pw`` of the PW-conv2 filters, which does not change DW widths)."""
    torch.manual_seed(seed)
    model = build_model("timm", model_name)
    ex = torch.randn(2, 3, image_size, image_size)
    DEPruner(model, ex, dw_pruning_ratio=dw, pw_pruning_ratio=pw, variant=variant,
             ignored_layers=[classifier_of(model)]).step()
    return dw_layers(model, image_size, batch, channels_last)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``deprune kernels`` arguments."""
    from .cli import _int_at_least, _ratio  # the same argument checks as `deprune prune`

    p.add_argument("--model", default="mobilenetv2_100", help="timm model, random init (default: %(default)s)")
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCHS), help="(default: %(default)s)")
    p.add_argument("--batch", type=_int_at_least(1), default=32, help="(default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="(default: %(default)s)")
    p.add_argument("--image-size", type=_int_at_least(8), default=224, help="(default: %(default)s)")
    p.add_argument("--dw", type=_ratio, default=0.78, help="DW tap pruning ratio (default: %(default)s)")
    p.add_argument("--pw", type=_ratio, default=0.5, help="PW-conv2 pruning ratio (default: %(default)s)")
    p.add_argument("--variant", default="BH", choices=sorted(VARIANTS), help="(default: %(default)s)")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                   help="(default: all)")
    p.add_argument("--nchw", action="store_true", help="report the NCHW kernels (default: channels_last)")
    p.add_argument("--copy-tbps", type=float, default=None,
                   help="device copy bandwidth to model against, TB/s (default: the arch's assumption)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--save-layers", default=None, metavar="PATH",
                   help="also save the layers (geometry + masks) for `python -m deprune_plugin.kernels.report`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``deprune kernels``; returns the exit status."""
    layers = pruned_dw_layers(args.model, args.batch, args.image_size, args.dw, args.pw, args.variant,
                              channels_last=not args.nchw)
    if args.save_layers:
        save_layers(layers, args.save_layers)
    rep = kernel_report(layers, args.arch, args.dtype, args.kernels, copy_tbps=args.copy_tbps,
                        progress=not args.quiet)
    rep["model"] = args.model
    rep["pruning"] = {"variant": args.variant, "dw": args.dw, "pw": args.pw, "image_size": args.image_size}
    print_report(rep)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rep, fh, indent=1)
            fh.write("\n")
    return 0


def run(argv: Sequence[str]) -> int:
    """``main`` from a command line (for scripts)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    return main(p.parse_args(argv))
