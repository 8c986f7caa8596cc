"""``export(model, path, format=...)``: a pruned model as an ONNX file or an OpenVINO IR, checked after writing.

What is written is the inference form :func:`~deprune_plugin.accelerate` builds on the torch path, from a
copy of the model with its tap masks made permanent (so no mask hook or ``Identity`` stands between a DW
weight and its conv, and every BatchNorm after a conv is folded into it: no ``BatchNormalization`` node
remains for the runtime to fold or, worse, fail to fold). Batch is dynamic, and so are the spatial sizes of
4-D inputs. After writing, the file is run in a CPU runtime (ONNX Runtime for ONNX, OpenVINO for IR; the
other one when that one is not installed) on the example input and on a second input of another batch
and spatial size where the model accepts one; a file that disagrees with the model is deleted and the
call raises. A dynamic file is only written where it can be verified at that second size: a model whose
output depends on the input size in a way the traced graph fixes (TF "SAME" padding computed in Python,
fixed-size reshapes) matches at the example size only, and is refused with the way out, a fixed-size
file (``dynamic=False``).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.masks import remove_tap_masks
from .api import AccelerateConfig, _default_inputs, accelerate
from .runtimes import RUNTIMES, runtime_available, to_onnx
from .selfcheck import check_inputs, outputs_agree, shape_label

__all__ = ["EXPORT_FORMATS", "ExportCheckFailed", "export"]

#: format -> (file suffix, runtimes that can check it, in order of preference)
EXPORT_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": (".onnx", ("onnxruntime", "openvino")),
    "openvino": (".xml", ("openvino",)),
}


class ExportCheckFailed(RuntimeError):
    """The written file disagreed with the model (or its runtime could not run it) and was deleted.

    A ``RuntimeError`` (what this failure raised before it had a class of its own), told apart so that
    callers can report a refused file, whose cause is the model or the export settings (e.g. the input
    size), differently from a failure of the code."""


def _check_runtime(format: str) -> str | None:
    """The runtime that checks files of ``format``, or ``None`` when none is installed."""
    return next((r for r in EXPORT_FORMATS[format][1] if r in RUNTIMES and runtime_available(r)[0]), None)


def _check_args(model: nn.Module, path: str | os.PathLike, format: str, example_inputs, dynamic: bool,
                check: bool) -> tuple[Path, tuple | None]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {tuple(EXPORT_FORMATS)}, got {format!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    suffix = EXPORT_FORMATS[format][0]
    if path.suffix != suffix:
        raise ValueError(f"path {str(path)!r}: a {format} file must end in {suffix!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if format == "openvino" and not runtime_available("openvino")[0]:
        raise RuntimeError(f"format='openvino': {runtime_available('openvino')[1]}")
    if not isinstance(dynamic, bool) or not isinstance(check, bool):
        raise TypeError(f"dynamic and check must be bools, got {dynamic!r}, {check!r}")
    if dynamic and not check:
        raise ValueError("check=False with dynamic=True would write a dynamic file never verified at a second "
                         "input size; keep check=True, or pass dynamic=False for a fixed-size file")
    if dynamic and _check_runtime(format) is None:
        raise RuntimeError(f"a dynamic {format} file must be verified at a second input size and no runtime to "
                           "run it is installed (pip install 'deprune-plugin[cpu]'); or pass dynamic=False for a "
                           "fixed-size file, written unchecked with a warning")
    if example_inputs is None:
        return path, None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                        f"got {type(example_inputs).__name__}")
    return path, tuple(example_inputs)


def _written_files(path: Path, format: str) -> list[Path]:
    return [path, path.with_suffix(".bin")] if format == "openvino" else [path]


def _run_file(session, args: tuple) -> list[torch.Tensor]:
    """Run a runtime session (built from the written file) on ``args``."""
    arrays = [np.ascontiguousarray(a.detach().cpu().float().numpy()) for a in args]
    return [torch.from_numpy(np.asarray(o)) for o in session.run(arrays)]


@torch.no_grad()
def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           example_inputs: torch.Tensor | tuple | None = None, dynamic: bool = True, check: bool = True) -> Path:
    """Write ``model`` (pruned or not; not modified) for a deployment runtime and check the file.

    Args:
        model: the model, on any device (exported from a CPU fp32 copy).
        path: ``*.onnx`` for ``format="onnx"``, ``*.xml`` for ``format="openvino"`` (a ``.bin`` with the
            weights is written beside it).
        format: ``"onnx"`` or ``"openvino"``.
        example_inputs: an input to trace with; default a ``[1, C, 64, 64]`` random image (seeded).
        dynamic: dynamic batch and (for 4-D inputs) spatial axes. Needs ``check`` and a runtime to verify
            the file at a second input size.
        check: run the written file in a CPU runtime against ``model`` (see the module doc). With
            ``dynamic=False`` and no runtime installed to check it, one warning says the file is unchecked.

    Returns:
        ``path``.

    Raises:
        TypeError / ValueError naming the argument, and RuntimeError for a dynamic file no installed runtime
        can verify, before anything is written; :class:`ExportCheckFailed` (a RuntimeError) when the
        written file disagrees with the model (the file is deleted), saying when the model is input-size
        dependent.
    """
    path, example_inputs = _check_args(model, path, format, example_inputs, dynamic, check)
    source = copy.deepcopy(model).float().cpu().eval()
    remove_tap_masks(source)  # permanent: pruned taps are exact zeros in plain conv weights
    if example_inputs is None:
        example_inputs = _default_inputs(source, torch.device("cpu"), torch.float32)
    example_inputs = tuple(t.detach().float().cpu() for t in example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the self-check's verdict is in the report
        fast = accelerate(source, backend="torch", example_inputs=example_inputs,
                          config=AccelerateConfig(channels_last=False, cpu_runtimes=()))
    onnx = to_onnx(fast, example_inputs, dynamic=dynamic)
    if format == "onnx":
        path.write_bytes(onnx)
    else:
        import openvino as ov

        ov.save_model(ov.Core().read_model(onnx), str(path), compress_to_fp16=False)  # fp16 would not match
    if check:
        _check_file(source, path, format, example_inputs, dynamic)
    return path


def _check_file(source: nn.Module, path: Path, format: str, example_inputs: tuple, dynamic: bool) -> None:
    runtime = _check_runtime(format)
    if runtime is None:
        warnings.warn(f"deprune_plugin.export: {path} written but not checked: no runtime installed to run it "
                      "(pip install 'deprune-plugin[cpu]')", RuntimeWarning, stacklevel=3)
        return
    inputs, _ = check_inputs(source, example_inputs)
    if not dynamic:
        inputs = inputs[:1]
    session = None
    for k, item in enumerate(inputs):
        try:
            session = session or RUNTIMES[runtime].build(str(path), torch.get_num_threads())  # the file, as written
            ok, bad = outputs_agree(lambda *a, s=session: _run_file(s, a), [item])
        except Exception as e:  # noqa: BLE001 - a file the runtime cannot run is as wrong as one that disagrees
            ok, bad = False, f"{item.label}: {type(e).__name__}: {e}"
        if not ok:
            for f in _written_files(path, format):
                f.unlink(missing_ok=True)
            hint = ""
            if k > 0:
                hint = (f"; it matches the model at the example input {shape_label(example_inputs)}, so the "
                        "model's output depends on the input size in a way the traced graph fixes (e.g. TF "
                        "'SAME' padding): export a fixed-size file with dynamic=False")
            raise ExportCheckFailed(f"export to {path} failed its check in {runtime} on the {bad} (file deleted)"
                                    + hint)

