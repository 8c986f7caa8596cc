"""The ``deprune`` command (also ``python -m deprune_plugin``).

Subcommands:

- ``deprune prune``: build (and briefly train) a model, prune it with DEPrune, fine-tune, measure
  accuracy and latency before/after, save a file that ``deprune_plugin.load`` (``from deprune_plugin import
  load``) rebuilds in one call, print the per-layer table and write a PNG report.
- ``deprune inspect PATH``: the tap-mask report and stored metrics of a saved model.
- ``deprune export PATH``: the model as a checked ONNX file or OpenVINO IR.
- ``deprune bench ...``: speed benchmark (:mod:`deprune_plugin.app.bench`).
- ``deprune kernels ...``: static performance report of the DW kernels (registers, spills, occupancy, load
  widths, modelled time) on a pruned model's DW layers, no GPU needed (:mod:`deprune_plugin.app.kernel_report`).
- ``deprune gpu-check --out DIR``: every GPU measurement and check in one run, one JSON
  (:mod:`deprune_plugin.app.gpu_check`); ``--dry-run`` rehearses it on the CPU.

Bad input is reported as one line ``deprune: error: ...`` on stderr with exit status 2, and is detected
before any training starts, so a failed call writes nothing. An exported file that its check refuses is
deleted and reported the same way (exit status 2), with what to try. An unexpected internal error is one
line ``deprune: internal error: ...`` (exit status 1) that says how to see the traceback: ``--debug``
anywhere on the command line, or ``DEPRUNE_DEBUG=1`` in the environment. A finished ``prune`` run is saved
before its optional steps (latency); an optional step that fails is a one-line warning. Warnings, ours and
the libraries', are one line ``deprune: warning: ...`` each.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

PROG = "deprune"
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
DEBUG_ENV = "DEPRUNE_DEBUG"
DEFAULT_OUT_DIR = "deprune_out"  # where `deprune prune` writes the outputs whose paths are not given
DEFAULT_OUT_NAME = "pruned.pt"
RECALIBRATION_BATCHES = 20  # batches of training data for BatchNorm recalibration after pruning


class BadInput(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`BadInput` (one line, no usage block) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


# ---------------------------------------------------------------------------------------------- arguments
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return value


def _ratio_closed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_prune_arguments(p: argparse.ArgumentParser) -> None:
    from ..core.zoo import SOURCES
    from ..tp_glue.pruner import VARIANTS

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobilenetv2_100", help="model name (default: %(default)s)")
    g.add_argument("--source", default="timm", choices=SOURCES, help="model zoo (default: %(default)s)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="state dict to start from (a classifier of another class count is re-initialised); "
                        "without one the model is trained from scratch on the built-in data first")
    g = p.add_argument_group("pruning (default: latency-aware, for the machine this runs on)")
    g.add_argument("--latency-budget", type=_budget, default=None, metavar="FRACTION",
                   help="latency of the pruned model on --target at --latency-size, batch 1, as a fraction of "
                        f"the unpruned model's (default: {DEFAULT_BUDGET} unless --paper, --dw or --pw is given)")
    g.add_argument("--target", default="auto", choices=["auto", "openvino", "onnxruntime", "torch", "cuda"],
                   help="where the model will run: auto = cuda with --device cuda, else openvino (default: auto)")
    g.add_argument("--latency-size", type=_int_at_least(8), default=224,
                   help="input side the latency is asked and measured at (default: %(default)s)")
    g.add_argument("--paper", action="store_true",
                   help="the paper's fixed ratios instead (DEPrune --variant at --dw / --pw)")
    g.add_argument("--dw", type=_ratio, default=None,
                   help="DW tap pruning ratio (fixed ratios: default 0.78; latency-aware: the tap ratio tried "
                        "where the target gains from pruned taps)")
    g.add_argument("--pw", type=_ratio, default=None,
                   help="PW-conv2 filter pruning ratio; giving it selects fixed ratios (default 0.5)")
    g.add_argument("--variant", default="BH", choices=sorted(VARIANTS),
                   help="plain = DEPrune, B = +BWT, BH = +BWT+HSR (default: %(default)s)")
    g.add_argument("--steps", type=_int_at_least(1), default=1,
                   help="iterative pruning steps, with one short fine-tune epoch between (default: 1)")
    g = p.add_argument_group("training")
    g.add_argument("--data", default="digits",
                   help="'digits' (built in) or a CIFAR-10 / ImageFolder directory (default: %(default)s)")
    g.add_argument("--image-size", type=_int_at_least(8), default=32, help="input side (default: %(default)s)")
    g.add_argument("--limit", type=_int_at_least(1), default=None, help="use at most N images per split")
    g.add_argument("--batch-size", type=_int_at_least(1), default=64, help="(default: %(default)s)")
    g.add_argument("--pretrain-epochs", type=_int_at_least(0), default=None,
                   help="epochs before pruning (default: 3 without --checkpoint on the built-in data, else 0)")
    g.add_argument("--finetune-epochs", type=_int_at_least(0), default=3,
                   help="epochs after pruning (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="pre-training lr (default: %(default)s)")
    g.add_argument("--finetune-lr", type=_positive_float, default=0.05, help="fine-tuning lr (default: %(default)s)")
    g.add_argument("--no-recalibrate", action="store_true",
                   help="do not re-estimate BatchNorm statistics right after pruning (default: recalibrate)")
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune with knowledge distillation from the unpruned model (default: on; on the "
                        "built-in digits it adds ~3 points to DEPrune-BH, see README)")
    g.add_argument("--kd-temperature", type=_positive_float, default=4.0, help="(default: %(default)s)")
    g.add_argument("--kd-alpha", type=_ratio_closed, default=0.5,
                   help="weight of the soft-target loss in [0, 1] (default: %(default)s)")
    g.add_argument("--taps", default="magnitude", choices=["magnitude", "geometry"],
                   help="DW tap importance: |w| (the paper) or |w| x fraction of outputs where the tap reads "
                        "real input (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                   help="folder of the outputs not given a path of their own, created when missing "
                        f"(default: %(default)s: %(default)s/{DEFAULT_OUT_NAME} and its figure)")
    g.add_argument("--out", default=None, metavar="PATH",
                   help=f"output model file, used as given (default: OUT_DIR/{DEFAULT_OUT_NAME})")
    g.add_argument("--figure", default=None, metavar="PATH.png", help="report figure (default: next to --out)")
    g.add_argument("--no-figure", action="store_true", help="do not write the figure")
    g.add_argument("--latency-batch", type=_int_at_least(1), default=1,
                   help="batch of the final latency measurement, at --latency-size (default: %(default)s)")
    g.add_argument("--latency-reps", type=_int_at_least(1), default=50, help="(default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    help_text = "speed benchmark: unpruned vs pruned vs accelerate(pruned)"
    try:
        from . import bench
        p = sub.add_parser("bench", help=help_text, description=bench.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.add_arguments(p)
        p.set_defaults(func=lambda args: _run_bench(bench, args))
    except Exception as e:  # noqa: BLE001 - a broken/missing bench module must not break `prune`
        reason = f"{type(e).__name__}: {e}"
        p = sub.add_parser("bench", help=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: _fail(f"bench is not available ({reason})"))


def _run_bench(bench: Any, args: argparse.Namespace) -> int:
    if getattr(args, "json", None):
        _check_writable(args.json, "--json")  # before the benchmark, not after it
    try:
        return bench.main(args)
    except ValueError as e:  # bench reports bad arguments (unknown model, no GPU) as ValueError
        _fail(str(e))


def _add_kernels(sub: argparse._SubParsersAction) -> None:
    from . import kernel_report

    p = sub.add_parser("kernels", help="static performance report of the DW kernels (nvcc + cuobjdump, no GPU)",
                       description=kernel_report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernel_report.add_arguments(p)
    p.set_defaults(func=_run_kernels)


def _run_kernels(args: argparse.Namespace) -> int:
    from ..kernels.report import find_tool
    from . import kernel_report

    if args.json:
        _check_writable(args.json, "--json")  # before compiling, not after
    missing = [t for t in ("nvcc", "cuobjdump") if find_tool(t) is None]
    if missing:
        _fail(f"deprune kernels needs the CUDA toolkit's {' and '.join(missing)} (not found on PATH, in "
              "$CUDA_HOME/bin or next to nvcc)")
    return kernel_report.main(args)


def _add_gpu_check(sub: argparse._SubParsersAction) -> None:
    from . import gpu_check

    p = sub.add_parser("gpu-check", help="on a GPU: tests, sanitizers, kernel timings, bench; one JSON",
                       description=gpu_check.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_check.add_arguments(p)
    p.set_defaults(func=_run_gpu_check)


def _run_gpu_check(args: argparse.Namespace) -> int:
    from . import gpu_check

    _check_creatable_dir(args.out, "--out")
    try:
        config = gpu_check.config_from_args(args)
        config.validate()
    except ValueError as e:
        _fail(str(e))
    gpu_check.run_gpu_check(config)  # records failed steps in its JSON; the run itself succeeded
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``deprune`` argument parser (errors raise :class:`BadInput`)."""
    parser = _Parser(prog=PROG, description="DEPrune for torch-pruning: prune, inspect and benchmark DSConv CNNs.",
                     epilog=f"--debug (anywhere) or {DEBUG_ENV}=1: show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,inspect,export,bench,compare}")
    p = sub.add_parser("prune", help="train, prune, fine-tune, measure and save a model",
                       description=_PRUNE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_prune_arguments(p)
    p.set_defaults(func=run_prune)
    p = sub.add_parser("inspect", help="per-layer tap-mask report and metrics of a saved model")
    p.add_argument("path", help="a file written by `deprune prune` (or deprune_plugin.save)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trusted", action="store_true",
                   help="allow full unpickling for a file that needs it; ONLY for files you made "
                        "(unpickling can run code from the file). Default: weights only")
    p.set_defaults(func=run_inspect)
    p = sub.add_parser("export", help="write a saved pruned model as a checked ONNX file or OpenVINO IR",
                       description="Masks made permanent, BatchNorm folded, dynamic batch and spatial size (or one "
                                   "fixed input size with --static); the written file is run in ONNX Runtime / "
                                   "OpenVINO and compared with the model, and deleted when they disagree.")
    p.add_argument("path", help="a file written by `deprune prune` (or deprune_plugin.save)")
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"], help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="output file (default: PATH with .onnx, or .xml for openvino)")
    p.add_argument("--input-size", type=_int_at_least(8), default=None,
                   help="image size to trace with (default: the size stored in the file)")
    p.add_argument("--static", action="store_true",
                   help="one fixed input shape (batch 1, --input-size or the stored size) instead of dynamic batch "
                        "and spatial size: for models whose output depends on the input size in a way a dynamic "
                        "file cannot follow")
    p.add_argument("--no-check", action="store_true",
                   help="with --static only: do not run the written file against the model (a dynamic file must "
                        "be checked, at a second batch and size too)")
    p.add_argument("--trusted", action="store_true",
                   help="allow full unpickling for a file that needs it; ONLY for files you made")
    p.set_defaults(func=run_export)
    _add_bench(sub)
    _add_compare(sub)
    _add_kernels(sub)
    _add_gpu_check(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return parser


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="accuracy of DEPrune plain/B/BH vs channel pruning vs 2:4, several seeds",
                       description=_COMPARE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (built in) or a CIFAR-10 / ImageFolder folder")
    p.add_argument("--model", default="mobilenetv2_050", help="timm model name (default: %(default)s)")
    p.add_argument("--image-size", type=_int_at_least(8), default=32, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(2), default=64, help="(default: %(default)s)")
    p.add_argument("--limit", type=_int_at_least(2), default=None, help="use at most N images per split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="any of: dense deprune deprune-b deprune-bh dw-only pw-only channels 2:4, channels-R, "
                        "expanded-R, latency-B (a latency budget), latency:METHOD (the latency METHOD measured, "
                        "METHOD listed earlier) (default: dense deprune deprune-b deprune-bh channels 2:4)")
    p.add_argument("--dense-epochs", type=_int_at_least(0), default=12, help="(default: %(default)s)")
    p.add_argument("--finetune-epochs", type=_int_at_least(0), default=6, help="(default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="dense training lr (default: %(default)s)")
    p.add_argument("--finetune-lr", type=_positive_float, default=0.01, help="(default: %(default)s)")
    p.add_argument("--dw", type=_ratio, default=0.78, help="DW tap pruning ratio (default: %(default)s)")
    p.add_argument("--pw", type=_ratio, default=0.5, help="PW-conv2 filter pruning ratio (default: %(default)s)")
    p.add_argument("--taps", default="magnitude", choices=["magnitude", "geometry"],
                   help="DW tap importance of the DEPrune methods (default: %(default)s)")
    p.add_argument("--channel-floor", action="store_true", help="keep one input-reading tap per channel")
    p.add_argument("--no-recalibrate", action="store_true", help="no BatchNorm recalibration after pruning")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the dense model while fine-tuning, every pruned method alike (default: on)")
    p.add_argument("--json", default=None, metavar="PATH.json", help="write the results as JSON")
    p.add_argument("--figure", default=None, metavar="PATH.png", help="accuracy vs MACs plot")
    p.add_argument("--latency-figure", default=None, metavar="PATH.png",
                   help="accuracy vs measured latency plot, Pareto front marked")
    p.add_argument("--latency-target", default="openvino", choices=["openvino", "onnxruntime", "torch", "cuda", "none"],
                   help="where every run's latency is measured ('none': not measured) (default: %(default)s)")
    p.add_argument("--latency-size", type=_int_at_least(8), default=224, help="(default: %(default)s)")
    p.add_argument("--latency-batch", type=_int_at_least(1), default=1, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_compare)


_COMPARE_DOC = """\
Prune one trained model several ways, fine-tune each with the same recipe, over several seeds; print a
table (mean ± std) and optionally write JSON and a PNG (accuracy vs non-zero MACs). Channel pruning is
matched to DEPrune-BH's non-zero MACs.

Example (about 10 minutes on a 2-core CPU, built-in digits data):
  deprune compare --json compare.json --figure compare.png
"""


def run_compare(args: argparse.Namespace) -> int:
    """``deprune compare``: see :mod:`deprune_plugin.app.compare`. Returns the exit status."""
    import torch

    from .compare import DEFAULT_METHODS, CompareConfig, compare, format_table, plot_compare, plot_latency, write_json

    for path, what in ((args.json, "--json"), (args.figure, "--figure"), (args.latency_figure, "--latency-figure")):
        if path:
            _check_writable(path, what)
    try:
        cfg = CompareConfig(data=args.data, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                            limit=args.limit, seeds=tuple(args.seeds),
                            methods=tuple(args.methods or DEFAULT_METHODS), dense_epochs=args.dense_epochs,
                            finetune_epochs=args.finetune_epochs, lr=args.lr, finetune_lr=args.finetune_lr,
                            dw=args.dw, pw=args.pw, taps=args.taps, channel_floor=args.channel_floor,
                            recalibrate=not args.no_recalibrate, distill=args.distill, device=args.device,
                            quiet=args.quiet,
                            latency_target=None if args.latency_target == "none" else args.latency_target,
                            latency_size=args.latency_size, latency_batch=args.latency_batch)
    except ValueError as e:
        _fail(str(e))
    before = _flush_denormal_enabled()
    torch.set_flush_denormal(True)  # tiny weights after weight decay otherwise slow CPU training down a lot
    try:
        result = compare(cfg)
    except ValueError as e:  # bad data folder or model name
        _fail(str(e))
    finally:
        torch.set_flush_denormal(before)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.figure:
        plot_compare(result, args.figure)
        print(f"wrote {args.figure}")
    if args.latency_figure:
        plot_latency(result, args.latency_figure)
        print(f"wrote {args.latency_figure}")
    return 0


_PRUNE_DOC = f"""\
Prune a DSConv CNN and fine-tune it: by default for a latency budget on the machine it runs on (OpenVINO on a
CPU), choosing per block expanded channels, residual streams and DW taps; --paper for DEPrune's fixed ratios.

Example (a few minutes on a laptop CPU, built-in digits data, nothing downloaded):
  deprune prune --model mobilenetv2_100                        # writes {DEFAULT_OUT_DIR}/pruned.pt and pruned.png
  deprune prune --model mobilenetv2_100 --latency-budget 0.6 --target onnxruntime
  deprune prune --model mobilenetv2_100 --paper --dw 0.78 --pw 0.5     # DEPrune-BH, the paper's ratios
  python -c "from deprune_plugin import load; m = load('{DEFAULT_OUT_DIR}/pruned.pt')"
"""


DEFAULT_BUDGET = 0.7
RUNTIME_TARGETS = ("openvino", "onnxruntime")  # targets whose runtime accelerate() runs: the speed-up is timed there


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def prune_mode(args: argparse.Namespace, device: str = "cpu") -> tuple[float | None, str, float, float]:
    """``(latency budget or None for fixed ratios, target, dw ratio, pw ratio)`` from the prune flags
    (``device``: the resolved device type, which ``--target auto`` follows)."""
    fixed = args.paper or (args.latency_budget is None and (args.dw is not None or args.pw is not None))
    dw = 0.78 if args.dw is None else args.dw
    pw = 0.5 if args.pw is None else args.pw
    if fixed:
        if args.latency_budget is not None:
            _fail("--latency-budget and --paper exclude each other: --paper prunes at fixed ratios")
        return None, "", dw, pw
    if args.pw is not None:
        _fail("--pw is a fixed ratio: with --latency-budget the search chooses the widths (drop --pw, or add --paper)")
    target = args.target
    if target == "auto":
        target = "cuda" if device == "cuda" else "openvino"
    return (DEFAULT_BUDGET if args.latency_budget is None else args.latency_budget), target, dw, pw


def _fail(message: str) -> NoReturn:
    raise BadInput(message)


# ---------------------------------------------------------------------------------------------- validation
def _check_writable(path: str, what: str) -> None:
    """Fail unless ``path`` can be created: its directory exists and accepts a file (tested by creating and
    removing a temporary one, since ``os.access`` says yes to root even on read-only mounts)."""
    if os.path.isdir(path):
        _fail(f"cannot write {what} {path!r}: it is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _fail(f"cannot write {what} {path!r}: directory {folder!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deprune-write-test-"):
            pass
    except OSError as e:
        _fail(f"cannot write {what} {path!r}: {e.strerror or e}")


def _check_creatable_dir(path: str, what: str) -> None:
    """Fail unless ``path`` is a folder that accepts files or can be made one. Nothing is created here (a
    failed run writes nothing): its nearest existing ancestor must be a folder that accepts files."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        _fail(f"cannot write {what} {path!r}: {probe!r} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".deprune-write-test-"):
            pass
    except OSError as e:
        _fail(f"cannot write {what} {path!r}: {e.strerror or e}")


def _check_input_file(path: str, what: str) -> None:
    """Fail unless ``path`` is an existing file; a folder is named as one (not as a missing file)."""
    if os.path.isdir(path):
        _fail(f"{what} {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        _fail(f"{what} {path!r} does not exist")


def _load_failure(path: str, what: str, error: Exception) -> NoReturn:
    """Report a file that could not be loaded: a file that is no PyTorch file at all says so (torch's own
    error would suggest full unpickling, which cannot help)."""
    from ..core.checks import torch_file_problem

    problem = torch_file_problem(path)
    if problem is not None:
        _fail(f"{what} {path!r} is {problem}")
    _fail(f"cannot load {what} {path!r}: {type(error).__name__}: {_one_line(error)}")


def _state_dict_from(obj: Any, path: str) -> dict:
    if isinstance(obj, dict) and obj.get("format", "").startswith("deprune-"):
        _fail(f"checkpoint {path!r} is an already pruned deprune_plugin model; load it with "
              "deprune_plugin.load (or use `deprune inspect`)")
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        _fail(f"checkpoint {path!r} holds no state dict")
    # DDP / DataParallel checkpoints prefix every key with "module."
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _load_checkpoint(model, path: str) -> str | None:
    """Load a state dict into ``model``; a classifier for another class count is skipped (re-initialised).
    Returns a note about skipped keys, or None."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        from ..core.checks import torch_file_problem

        if torch_file_problem(path) is None:  # a real pickle with objects beyond tensors: say so, not torch's advice
            _fail(f"checkpoint {path!r} holds more than tensors and plain data (e.g. a whole pickled model), and "
                  "reading it would need full unpickling, which can run code from the file; save and pass "
                  "model.state_dict() instead")
        _load_failure(path, "checkpoint", e)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        _load_failure(path, "checkpoint", e)
    state = _state_dict_from(obj, path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    from ..core.zoo import classifier_of

    head = classifier_of(model)
    head_keys = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p in ("weight", "bias")}
    if any(k not in head_keys for k in skipped):
        bad = next(k for k in skipped if k not in head_keys)
        _fail(f"checkpoint {path!r} does not fit model: {bad} has shape {tuple(state[bad].shape)}, "
              f"the model needs {tuple(own[bad].shape)}")
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        _fail(f"checkpoint {path!r} does not fit model: {len(missing)} missing key(s) "
              f"(e.g. {missing[:1]}), {len(unexpected)} unexpected key(s) (e.g. {unexpected[:1]})")
    return f"classifier re-initialised ({', '.join(skipped)} did not fit)" if skipped else None


@dataclass
class _PruneSetup:
    """Everything validated before the first epoch."""

    device: Any
    train_loader: Any
    test_loader: Any
    num_classes: int
    model: Any
    pruner: Any
    pretrain_epochs: int
    out: str
    figure: str | None
    note: str | None


def _setup_prune(args: argparse.Namespace) -> _PruneSetup:
    import torch

    from ..core.zoo import build_model, classifier_of
    from ..tp_glue.importance import DEPruneImportance
    from ..tp_glue.pruner import DEPruner
    from .data import DIGITS, make_loaders, skipped_images
    from .training import reinit_classifier_, resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        _fail(str(e))
    if args.checkpoint is not None:
        _check_input_file(args.checkpoint, "checkpoint")
    if args.out is None:  # made at save time, so that a run that fails before writes nothing
        _check_creatable_dir(args.out_dir, "--out-dir")
        out = os.path.join(args.out_dir, DEFAULT_OUT_NAME)
    else:
        _check_writable(args.out, "--out")
        out = args.out
    figure = None if args.no_figure else (args.figure or os.path.splitext(out)[0] + ".png")
    # A default figure in an --out-dir still to be made is covered by the check of that folder.
    if figure is not None and (args.figure is not None or os.path.isdir(os.path.dirname(os.path.abspath(figure)))):
        _check_writable(figure, "--figure")
    try:
        train_loader, test_loader, num_classes = make_loaders(args.data, args.image_size, args.batch_size,
                                                              args.limit, args.seed)
    except ValueError as e:
        _fail(str(e))
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.source, args.model, num_classes=num_classes)
    except ValueError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision model that rejects num_classes
        _fail(f"cannot build {args.source} model {args.model!r}: {type(e).__name__}: {e}")
    reinit_classifier_(model)
    note = _load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if args.pretrain_epochs is not None:
        pretrain = args.pretrain_epochs
    else:
        pretrain = 3 if args.checkpoint is None and args.data == DIGITS else 0
    n_train = len(train_loader.dataset)
    if n_train < 2 and (pretrain or args.finetune_epochs):
        _fail(f"{n_train} training image (--limit {args.limit}): training needs at least 2 "
              "(a batch of 1 crashes BatchNorm)")
    budget, target, dw, pw = prune_mode(args, device.type)
    # the saved run states what was used, not what was left to defaults
    args.dw, args.pw = dw, (pw if budget is None else None)
    args.latency_budget, args.target = budget, (target or None)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    latency = {}
    if budget is not None:
        example = torch.randn(1, 3, args.latency_size, args.latency_size)
        sens = next(iter(train_loader))[0][:64]  # the proxy ranks channels on real images
        latency = {"latency_budget": budget, "target": target, "sensitivity_inputs": sens}
    try:
        pruner = DEPruner(model, example, importance=DEPruneImportance(taps=args.taps),
                          dw_pruning_ratio=dw, pw_pruning_ratio=pw, variant=args.variant,
                          iterative_steps=args.steps, ignored_layers=[classifier_of(model)], **latency)
    except (ValueError, TypeError) as e:
        hint = " (on the command line: --pw 0)" if "pw_pruning_ratio=0" in str(e) else ""
        _fail(f"cannot prune {args.model!r}: {e}{hint}")
    skipped = skipped_images(train_loader) + skipped_images(test_loader)
    if skipped:
        _warn(f"skipped {len(skipped)} unreadable image(s) of {args.data!r}, e.g. {skipped[0]}")
    return _PruneSetup(device, train_loader, test_loader, num_classes, model, pruner, pretrain, out, figure, note)


# ---------------------------------------------------------------------------------------------- prune
def _measure_latency(dense, pruned, args: argparse.Namespace, device) -> tuple[dict[str, float], str | None]:
    """Median ms per batch of the dense copy, the pruned model and (when it works) accelerate(pruned).

    accelerate() failing, or its model failing on the timing input, only drops that candidate (the note
    says why); anything else raises and the caller turns it into a warning."""
    import torch

    from ..accel import accelerate
    from ..core.timing import interleaved_medians

    x = torch.randn(args.latency_batch, 3, args.latency_size, args.latency_size, device=device)
    dense.to(device).eval()
    pruned.to(device).eval()
    fns = {"before": lambda: dense(x), "after": lambda: pruned(x)}
    fast_fns = {}
    note = None
    try:
        # the runtime the model was pruned for (a latency-aware prune), so the speed-up is the one it asked for
        backend = args.target if getattr(args, "target", None) in RUNTIME_TARGETS else "auto"
        fast_dense = accelerate(dense, backend=backend, example_inputs=x[:1])
        fast = accelerate(pruned, backend=backend, example_inputs=x[:1])
        with torch.inference_mode():
            fast_dense(x)  # trial calls: a model that fails here must not fail the timing loop
            fast(x)
        fast_fns = {"before, accelerated": lambda: fast_dense(x), "accelerated": lambda: fast(x)}
    except Exception as e:  # noqa: BLE001 - speed-up is optional; the pruned model is the product
        note = f"accelerate() failed, not timed: {type(e).__name__}: {_one_line(e)}"
    # Eager and accelerated pairs are timed apart: an eager call between two runtime calls evicts the
    # runtime's weights from the caches and leaves its thread pool spinning, which slows the larger model more.
    gap = 0.002 if device.type == "cpu" else 0.0
    medians = interleaved_medians(fns, reps=args.latency_reps, warmup=3, device=device,
                                  quiet=args.quiet, desc="latency", gap_s=gap)
    if fast_fns:
        medians.update(interleaved_medians(fast_fns, reps=args.latency_reps, warmup=3, device=device,
                                           quiet=args.quiet, desc="latency, accelerated", gap_s=gap))
    return {k: v * 1e3 for k, v in medians.items()}, note


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain data (what ``torch.load(weights_only=True)`` reads back)."""
    return {k: v for k, v in vars(args).items()
            if k != "func" and (v is None or isinstance(v, (str, int, float, bool)))}


def _flush_denormal_enabled() -> bool:
    """Whether the CPU flushes subnormal floats now (torch has no getter): 1e-30 * 1e-10 underflows to a
    subnormal float32, which reads 0 only under flush-to-zero."""
    import torch

    return bool((torch.full((1,), 1e-30) * 1e-10).item() == 0.0)


def run_prune(args: argparse.Namespace) -> int:
    """``deprune prune``: see the module doc. Returns the exit status.

    Flush-to-zero is on while it runs (tiny weights after weight decay otherwise slow CPU training down a
    lot) and restored on every exit path, so later numerics of the same process do not change."""
    import torch

    before = _flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        return _prune(args)
    finally:
        torch.set_flush_denormal(before)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr, flush=True)


def _prune(args: argparse.Namespace) -> int:
    from ..core.constant_channels import constant_channels, fold_constant_channels_
    from ..core.recalibration import recalibrate_bn
    from ..tp_glue.serialization import save
    from .plotting import plot_report
    from .training import evaluate, train

    s = _setup_prune(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if s.note:
        say(f"note: {s.note}")
    if args.checkpoint is None and not s.pretrain_epochs:
        say("note: no --checkpoint and no pre-training: pruning random weights")
    model, pruner, dev, q = s.model, s.pruner, s.device, args.quiet
    say(f"{args.source}/{args.model}: {s.num_classes} classes, {len(s.train_loader.dataset)} training / "
        f"{len(s.test_loader.dataset)} test images of {args.image_size}x{args.image_size}, device {dev}")
    if s.pretrain_epochs:
        say(f"pre-training {s.pretrain_epochs} epoch(s)")
        train(model, s.train_loader, s.pretrain_epochs, args.lr, dev, q, desc="pre-train")
    top1_before = evaluate(model, s.test_loader, dev, q)
    say(f"top-1 before pruning: {top1_before:.2f}%")
    dense = copy.deepcopy(model).cpu()
    t0 = time.perf_counter()
    for step in range(args.steps):
        model.cpu()  # the pruner's example input lives on the CPU; pruning is cheap there
        try:
            pruner.step()
        except ValueError as e:
            if "latency_budget" not in str(e):
                raise
            _fail(str(e).replace("latency_budget=", "--latency-budget "))
        if step < args.steps - 1 and args.finetune_epochs:
            train(model, s.train_loader, 1, args.finetune_lr, dev, q, desc=f"fine-tune step {step + 1}")
    prune_seconds = time.perf_counter() - t0
    model.cpu()
    summary = pruner.summary()
    top1_pruned = evaluate(model, s.test_loader, dev, q)
    top1_recal = None
    if not args.no_recalibrate:
        recalibrate_bn(model, s.train_loader, RECALIBRATION_BATCHES, device=dev, quiet=q)
        top1_recal = evaluate(model, s.test_loader, dev, q)
        say(f"top-1 right after pruning: {top1_pruned:.2f}%, after BatchNorm recalibration: {top1_recal:.2f}%")
    else:
        say(f"top-1 right after pruning: {top1_pruned:.2f}%")
    if args.finetune_epochs:
        say(f"fine-tuning {args.finetune_epochs} epoch(s)" + (" with distillation" if args.distill else ""))
        train(model, s.train_loader, args.finetune_epochs, args.finetune_lr, dev, q, desc="fine-tune",
              teacher=dense if args.distill else None, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha)
    # Fine-tuning moves running statistics again: a channel still constant on the data (its kept taps read only
    # padding) would leave a BN with ~0 variance, which makes the saved model numerically fragile.
    constant = fold_constant_channels_(model, constant_channels(model, s.train_loader, device=dev))
    n_constant = sum(len(v) for v in constant.values())
    if n_constant or summary.blind_channels:
        say(f"{summary.blind_channels} DW channel(s) read no input at {args.image_size}x{args.image_size}; "
            f"{n_constant} constant BatchNorm channel(s) folded into their biases")
    top1_after = evaluate(model, s.test_loader, dev, q)
    model.cpu()
    dense.cpu()
    metrics = {
        "top1": {"before": top1_before, "pruned": top1_pruned,
                 **({} if top1_recal is None else {"recalibrated": top1_recal}), "after": top1_after},
        "macs": {"before": summary.before.macs, "after": summary.after.macs},
        "params": {"before": summary.before.params, "after": summary.after.params},
        "dw_ratio": summary.dw_ratio, "dw_hsr": summary.dw_hsr_pattern, "pw_hsr": summary.pw_hsr_pattern,
        "prune_seconds": prune_seconds, "blind_dw_channels": summary.blind_channels,
        "constant_bn_channels_folded": n_constant,
    }
    rep = summary.latency
    if rep is not None:
        metrics["latency_search"] = {"target": rep.target, "modelled": rep.modelled, "budget": rep.budget,
                                     "dense_ms": rep.dense_s * 1e3, "predicted_ms": rep.predicted_s * 1e3,
                                     "measured_ms": None if rep.measured_s is None else rep.measured_s * 1e3,
                                     "stream_ratio": rep.stream_ratio, "proxy_loss": rep.proxy_loss}
    extra = {"metrics": metrics, "args": _plain_args(args), "group_size": pruner.group_size,
             "dw_targets": {r.name: r.target_ratio for r in summary.rows}, "summary": summary.table()}
    arch = {"source": args.source, "name": args.model, "kwargs": {"num_classes": s.num_classes}}

    def write() -> bool:
        """Save the model, then the figure; a figure that fails is a warning. Returns figure written."""
        os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)  # --out-dir may not exist yet
        save(model, s.out, history=pruner.pruning_history(), arch=arch,
             input_shape=(1, 3, args.image_size, args.image_size), extra=extra)
        if not s.figure:
            return False
        try:
            plot_report(summary, metrics, s.figure)
            return True
        except Exception as e:  # noqa: BLE001 - the figure is optional, the model is saved
            _warn(f"figure not written: {type(e).__name__}: {e}")
            return False

    # The finished run is saved before any optional step (latency); an optional step that fails is a warning.
    figure_ok = write()
    latency: dict[str, float] = {}
    try:
        latency, acc_note = _measure_latency(dense, model, args, dev)
        if acc_note:
            _warn(acc_note)
    except Exception as e:  # noqa: BLE001 - optional: the model is already saved
        _warn(f"latency not measured: {type(e).__name__}: {e}")
    model.cpu()
    if latency:
        metrics.update(latency_ms=latency, latency_device=dev.type, latency_batch=args.latency_batch,
                       latency_size=args.latency_size)
        figure_ok = write()  # again, with the latency panel
    print(summary.table())
    print(f"top-1: {top1_before:.2f}% -> {top1_after:.2f}%")
    if latency:
        print("latency ({} {}x{} batch {}, median): {}".format(dev.type, args.latency_size, args.latency_size,
                                                             args.latency_batch, ", ".join(
            f"{k} {v:.2f} ms" for k, v in latency.items())))
        if "accelerated" in latency:
            on = f" on {args.target}" if getattr(args, "target", None) in RUNTIME_TARGETS else ""
            print(f"speed-up of accelerate(pruned) over accelerate(unpruned){on}: "
                  f"{latency['before, accelerated'] / latency['accelerated']:.2f}x")
    print(f"saved {s.out}" + (f", figure {s.figure}" if figure_ok else ""))
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def inspect_report(path: str, trusted: bool = False) -> dict[str, Any]:
    """The tap-mask report of a saved model, recomputed from its masks, plus what the file stores.

    Files are read weights-only; ``trusted`` allows unpickling (only for files you made).

    Raises:
        BadInput: the file is missing or not a deprune_plugin model.
    """
    from ..core.cost import PARAMS_LABEL, count_params
    from ..core.masks import masked_convs, tap_mask
    from ..core.method import kept_per_range, real_ratio
    from ..tp_glue.serialization import load, load_extra

    _check_input_file(path, "file")
    try:
        model = load(path, trusted=trusted)
        extra = load_extra(path, trusted=trusted)
    except Exception as e:  # noqa: BLE001 - corrupt / foreign / untrusted files are input problems
        _load_failure(path, "file", e)
    group = int(extra.get("group_size", 32))
    targets = extra.get("dw_targets", {})
    layers = []
    for name, conv in masked_convs(model):
        keep = tap_mask(conv)
        layers.append({"name": name, "kernel": list(conv.kernel_size), "channels": int(keep.shape[0]),
                       "target_ratio": targets.get(name), "real_ratio": real_ratio(keep, group),
                       "pruned_fraction": 1.0 - float(keep.float().mean()),
                       "kept_per_range": kept_per_range(keep, group),
                       "zero_outside_mask": bool((conv.weight.detach()[~keep] == 0).all())})
    return {"path": path, "params": count_params(model), "params_definition": PARAMS_LABEL, "group_size": group,
            "layers": layers, "metrics": extra.get("metrics", {}), "args": extra.get("args", {})}


def _print_inspect(rep: dict[str, Any]) -> None:
    from ..core.cost import PARAMS_LABEL
    from ..core.summary import kept_str  # one run-length format for prune's table and inspect's

    head = f"{'layer':<34} {'k':>5} {'C':>5} {'target':>7} {'real':>7} {'pruned':>7}  {'K per range':<18} zero"
    print(f"{rep['path']}: {len(rep['layers'])} masked DW conv(s), {rep['params_definition']} "
          f"{rep['params'] / 1e6:.3f} M (group size {rep['group_size']})")
    print(head)
    print("-" * len(head))
    for r in rep["layers"]:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:.2%}"
        print(f"{r['name'][-34:]:<34} {r['kernel'][0]}x{r['kernel'][1]:<3} {r['channels']:>5} {target:>7} "
              f"{r['real_ratio']:>7.2%} {r['pruned_fraction']:>7.2%}  {kept_str(r['kept_per_range']):<18} "
              f"{'yes' if r['zero_outside_mask'] else 'NO'}")
    m = rep["metrics"]
    if m:
        print("-" * len(head))
        if "top1" in m:
            print("top-1: " + ", ".join(f"{k} {v:.2f}%" for k, v in m["top1"].items()))
        if "latency_ms" in m:
            print(f"latency ({m.get('latency_device', '?')} batch {m.get('latency_batch', '?')}): "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in m["latency_ms"].items()))
        if "macs" in m:
            print(f"MACs {m['macs']['before'] / 1e6:.1f} M -> {m['macs']['after'] / 1e6:.1f} M, {PARAMS_LABEL} "
                  f"{m['params']['before'] / 1e6:.3f} M -> {m['params']['after'] / 1e6:.3f} M, "
                  f"DW ratio {m.get('dw_ratio', 0):.2%} (HSR DW {m.get('dw_hsr', '-')}, PW {m.get('pw_hsr', '-')})")
    a = rep["args"]
    if a:
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in a.items()
                 if k != "command" and v is not None and v is not False]
        print("made with: deprune prune " + " ".join(flags))


def run_inspect(args: argparse.Namespace) -> int:
    """``deprune inspect PATH``. Returns the exit status."""
    rep = inspect_report(args.path, trusted=args.trusted)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_inspect(rep)
    return 0


# ---------------------------------------------------------------------------------------------- export
def run_export(args: argparse.Namespace) -> int:
    """``deprune export PATH --format onnx|openvino``. Returns the exit status."""
    import torch

    from ..accel import EXPORT_FORMATS, ExportCheckFailed, export
    from ..tp_glue.serialization import load, saved_input_shape

    if args.no_check and not args.static:
        # Only the check at a second batch and size shows whether a dynamic file is right at other sizes.
        _fail("--no-check needs --static: a dynamic file (any batch and image size) is only written after it "
              "was checked at a second batch and size; use --static --input-size N for an unchecked file of one "
              "fixed shape")
    _check_input_file(args.path, "file")
    out = args.out or os.path.splitext(args.path)[0] + EXPORT_FORMATS[args.format][0]
    if not out.endswith(EXPORT_FORMATS[args.format][0]):
        _fail(f"--out {out!r}: a {args.format} file must end in {EXPORT_FORMATS[args.format][0]!r}")
    _check_writable(out, "--out")
    try:
        model = load(args.path, trusted=args.trusted)
        shape = saved_input_shape(args.path, trusted=args.trusted) or [1, 3, 224, 224]
    except Exception as e:  # noqa: BLE001 - corrupt / foreign / untrusted files are input problems
        _load_failure(args.path, "file", e)
    if args.input_size:
        shape[-2:] = [args.input_size, args.input_size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape[1:], generator=g)
    size = "x".join(map(str, x.shape))
    try:
        export(model, out, format=args.format, example_inputs=x, dynamic=not args.static, check=not args.no_check)
    except ExportCheckFailed as e:  # the file disagreed with the model: the settings, not our code, must change
        tries = ["--input-size N (the image size the model is meant for)"]
        if not args.static:
            tries.append(f"--static (one fixed input shape, {size})")
        _fail(f"refused {out!r}: {_one_line(e)}; try {' or '.join(tries)}")
    if args.no_check:
        print(f"wrote {out} (static {size}, not checked)")
    elif args.static:
        print(f"wrote {out} (static {size}, checked against the model)")
    else:
        print(f"wrote {out} (checked against the model at {size} and another batch/size)")
    return 0


# ---------------------------------------------------------------------------------------------- main
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` while ``main`` runs: one line like :func:`_warn`'s. Python's default adds
    the file, line number and source line of the call, which mean nothing to a user of the command."""
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr if file is None else file, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deprune``; returns the exit status (2 = bad input or an exported file its check
    refused, 1 = internal error).

    ``--debug`` (anywhere on the command line) or ``DEPRUNE_DEBUG=1`` lets internal errors raise with
    their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # for this call only: a caller's own way of showing them comes back
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except BadInput as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback on request
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (run again with --debug or "
              f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    raise SystemExit(main())
