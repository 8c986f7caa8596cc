"""``export(model, path, format=...)``: a pruned model as an ONNX file or an OpenVINO IR, checked after writing.

What is written is the inference form :func:`~deprune_plugin.accelerate` builds on the torch path, from a
copy of the model with its tap masks made permanent (so no mask hook or ``Identity`` stands between a DW
weight and its conv, and every BatchNorm after a conv is folded into it: no ``BatchNormalization`` node
remains for the runtime to fold or, worse, fail to fold). Batch is dynamic, and so are the spatial sizes of
4-D inputs. After writing, the file is run in a CPU runtime (ONNX Runtime for ONNX, OpenVINO for IR; the
other one when that one is not installed) on the example input and on a second input of another batch
and spatial size where the model accepts one; a file that disagrees with the model is deleted and the
call raises.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.agreement import agreement
from ..core.masks import remove_tap_masks
from .api import AccelerateConfig, _default_inputs, accelerate
from .runtimes import RUNTIMES, runtime_available, to_onnx
from .selfcheck import check_inputs

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


def _check_args(model: nn.Module, path: str | os.PathLike, format: str, example_inputs) -> tuple[Path, tuple | None]:
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
        dynamic: dynamic batch and (for 4-D inputs) spatial axes.
        check: run the written file in a CPU runtime against ``model`` (see the module doc). With no
            runtime installed to check it, one warning says the file is unchecked.

    Returns:
        ``path``.

    Raises:
        TypeError / ValueError naming the argument, before anything is written; RuntimeError when the
        written file disagrees with the model (the file is deleted).
    """
    path, example_inputs = _check_args(model, path, format, example_inputs)
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
    runtime = next((r for r in EXPORT_FORMATS[format][1] if r in RUNTIMES and runtime_available(r)[0]), None)
    if runtime is None:
        warnings.warn(f"deprune_plugin.export: {path} written but not checked: no runtime installed to run it "
                      "(pip install 'deprune-plugin[cpu]')", RuntimeWarning, stacklevel=3)
        return
    inputs, _ = check_inputs(source, example_inputs)
    if not dynamic:
        inputs = inputs[:1]
    session = None
    for item in inputs:
        try:
            session = session or RUNTIMES[runtime].build(str(path), torch.get_num_threads())  # the file, as written
            got = _run_file(session, item.args)
            ref = item.expected if isinstance(item.expected, (tuple, list)) else [item.expected]
            bad = next((a.reason for g, r in zip(got, ref) for a in [agreement(g, r.float())] if not a.ok),
                       None if len(got) == len(ref) else "output count differs")
        except Exception as e:  # noqa: BLE001 - a file the runtime cannot run is as wrong as one that disagrees
            bad = f"{type(e).__name__}: {e}"
        if bad is not None:
            for f in _written_files(path, format):
                f.unlink(missing_ok=True)
            raise ExportCheckFailed(f"export to {path} failed its check in {runtime} on the {item.label}: "
                                    f"{bad} (file deleted)")
