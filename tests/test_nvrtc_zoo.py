"""Every specialisation the planners produce for the zoo compiles through NVRTC exactly as CuPy compiles it
(:func:`deprune_plugin.kernels.nvrtc.cupy_options`: ``-ftz=true``, ``--device-as-default-execution-space``,
``-arch=sm_XX``), for sm_80 and sm_90, with no stack frame and no local-memory traffic (spills).

No GPU is needed: NVRTC compiles without a driver and cuobjdump reads the cubin. The layers are those
``deprune kernels`` reports on (:func:`deprune_plugin.app.kernel_report.dw_layers`: timm models with random
weights, unpruned, 224x224, channels_last, with the 1x1 conv each DW conv would be fused with), planned by
:func:`deprune_plugin.kernels.report.kernel_plan` with each architecture's opt-in shared memory.

- default run: MobileNetV2, one layer per planner input kind (:data:`REPRESENTATIVE_MODELS`,
  :data:`REPRESENTATIVE_TARGETS`); the cubins are cached on disk (see the nvrtc module), so a rerun only
  plans and reads resources;
- ``pytest -m exhaustive tests/test_nvrtc_zoo.py``: every layer of every model and batch.
"""
from __future__ import annotations

import time
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from deprune_plugin.kernels import nvrtc
from deprune_plugin.kernels.report import ARCHS, find_tool, kernel_plan
from deprune_plugin.kernels.sources import specialize

_NVRTC_OK, _NVRTC_WHY = nvrtc.nvrtc_available()
_CUOBJDUMP = find_tool("cuobjdump")
pytestmark = [pytest.mark.nvcc,
              pytest.mark.skipif(not _NVRTC_OK, reason=_NVRTC_WHY),
              pytest.mark.skipif(_CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or triton wheel)")]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCH_NAMES = ("sm_80", "sm_90")
#: model -> batches (the batch changes plans through the planners' CTA-count terms)
MODELS = {"mobilenetv2_100": (1, 32), "efficientnet_b0": (32,), "convnext_tiny": (32,)}


@lru_cache(maxsize=None)
def _layers(model: str):
    """The DW layers at 224x224 (batch 1), with the fusable 1x1 of each found on a 64x64 input: which convs
    pair does not depend on the size, and accelerating the model at 224 costs minutes on a CI runner."""
    from deprune_plugin.app.kernel_report import dw_layers, fusable_pairs
    from deprune_plugin.core.zoo import build_model

    torch.manual_seed(0)
    net = build_model("timm", model)
    layers = dw_layers(net, 224, 1, channels_last=True, pairs=False)
    pairs = fusable_pairs(net, torch.randn(1, 3, 64, 64))
    return tuple(replace(layer, pw_out=f.get("pw_out", 0), act=f.get("act", "identity"),
                         residual=f.get("residual", False), pw_note=f.get("note", ""))
                 for layer in layers for f in [pairs.get(layer.name, {})])


@lru_cache(maxsize=None)
def specialisations(model: str, batch: int) -> dict[tuple, tuple[str, str, str]]:
    """``{(source, defines, arch): (entry, first layer planned to it, kernel)}`` over every DW layer of
    ``model`` at ``batch``, kernel (direct, DR, fused where the layer has a fusable 1x1), dtype and arch."""
    out: dict[tuple, tuple[str, str, str]] = {}
    for layer in _layers(model):
        layer = replace(layer, geometry=replace(layer.geometry, n=batch))
        kernels = ("direct", "dr") + (("fused",) if layer.pw_out else ())
        for kernel in kernels:
            for dtype in DTYPES.values():
                for arch in ARCH_NAMES:
                    plan = kernel_plan(kernel, layer, dtype, ARCHS[arch])
                    key = (plan.source, tuple(sorted((str(k), str(v)) for k, v in plan.defines.items())), arch)
                    out.setdefault(key, (plan.entry, f"{model}-b{batch}:{layer.name}", kernel))
    return out


def check(specs: dict[tuple, tuple[str, str, str]]) -> dict[str, object]:
    """Compile each specialisation (cached), read its resources; the failures, keyed by an id."""
    bad: dict[str, object] = {}
    for (source, defines, arch), (entry, where, kernel) in specs.items():
        code = specialize(source, dict(defines)).code
        result = nvrtc.compile_cubin(code, nvrtc.cupy_options(arch))
        use = nvrtc.resource_usage(result.cubin, entry)
        if use.stack or use.local or use.local_loads or use.local_stores:
            d = dict(defines)
            bad[f"{kernel} {arch} {d['DEPRUNE_SCALAR']} ({where})"] = use
    return bad


# The default run: MobileNetV2 at batch 32, one layer per planner input kind (window, stride, fused or not,
# residual), every dtype on sm_90 and fp16 on sm_80 (the other models build slowly on a CI runner: exhaustive).
REPRESENTATIVE_MODELS = {"mobilenetv2_100": (32,)}
REPRESENTATIVE_TARGETS = {("fp32", "sm_90"), ("fp16", "sm_90"), ("bf16", "sm_90"), ("fp16", "sm_80")}


def _representative() -> dict[tuple, tuple[str, str, str]]:
    out: dict[tuple, tuple[str, str, str]] = {}
    for model, batches in REPRESENTATIVE_MODELS.items():
        seen = set()
        for layer in _layers(model):
            g = layer.geometry
            kind = (g.kh, g.sh, bool(layer.pw_out), layer.residual)
            if kind in seen:
                continue
            seen.add(kind)
            one = replace(layer, geometry=replace(g, n=max(batches)))
            for kernel in ("direct", "dr") + (("fused",) if one.pw_out else ()):
                for dname, dtype in DTYPES.items():
                    for arch in ARCH_NAMES:
                        if (dname, arch) not in REPRESENTATIVE_TARGETS:
                            continue
                        plan = kernel_plan(kernel, one, dtype, ARCHS[arch])
                        key = (plan.source, tuple(sorted((str(k), str(v)) for k, v in plan.defines.items())), arch)
                        out.setdefault(key, (plan.entry, f"{model}-b{max(batches)}:{layer.name}", kernel))
    return out


def test_cupy_options_are_what_cupy_passes():
    opts = nvrtc.cupy_options("sm_90", include_dirs=["/inc"])
    assert opts[:2] == ("-std=c++17", "-I/inc") and opts[-1] == "-arch=sm_90"
    assert "-ftz=true" in opts
    assert ("--device-as-default-execution-space" in opts) == (nvrtc.nvrtc_version()[0] >= 12)
    assert nvrtc.cupy_options(80, include_dirs=[], cubin=False)[-1] == "-arch=compute_80"


def test_a_stack_frame_is_seen(tmp_path, monkeypatch):
    """The check can fail: a runtime-indexed private array lands in local memory (stack and LDL/STL)."""
    monkeypatch.setenv("DEPRUNE_NVRTC_CACHE", str(tmp_path))
    code = r"""extern "C" __global__ void k(float* y, int i) {
        float a[64];
        for (int j = 0; j < 64; ++j) a[j] = y[j * blockDim.x + threadIdx.x];
        a[i & 63] += 1.0f;
        float s = 0.0f;
        for (int j = 0; j < 64; ++j) s += a[j] * a[(j + i) & 63];
        y[threadIdx.x] = s;
    }"""
    result = nvrtc.compile_cubin(code, nvrtc.cupy_options("sm_90"))
    use = nvrtc.resource_usage(result.cubin, "k")
    assert use.stack >= 256 and use.local_stores > 0 and use.local_loads > 0
    assert nvrtc.compile_cubin(code, nvrtc.cupy_options("sm_90")).cached


def test_representative_zoo_specialisations_compile_without_stack_or_spills():
    specs = _representative()
    assert {s[2] for s in specs.values()} == {"direct", "dr", "fused"}
    t0 = time.perf_counter()
    bad = check(specs)
    print(f"{len(specs)} specialisations in {time.perf_counter() - t0:.1f} s")
    assert bad == {}


@pytest.mark.exhaustive
@pytest.mark.parametrize("model,batch", [(m, b) for m, bs in MODELS.items() for b in bs])
def test_every_zoo_specialisation_compiles_without_stack_or_spills(model, batch):
    specs = specialisations(model, batch)
    t0 = time.perf_counter()
    bad = check(specs)
    print(f"{model} batch {batch}: {len(specs)} specialisations in {time.perf_counter() - t0:.1f} s")
    assert bad == {}
