"""Static performance report of the DW kernels: what the compiler made of them and what that should cost on a
GPU, without a GPU (``deprune kernels``).

For each DW layer (a :class:`DWLayer`: geometry + keep mask) and kernel variant (``"direct"``, ``"dr"``) the
report takes the launch plan (:class:`.plan.KernelPlan`) the launcher would use for that layer, compiles the
plan's specialisation once per distinct ``#define`` set with ``nvcc -cubin -arch=sm_XX -Xptxas -v`` (cached
on disk by source hash), and reads:

- from ptxas: registers, spill stores + loads (bytes), static shared memory (``cuobjdump -res-usage``);
- from the SASS (``cuobjdump -sass``), see :func:`analyze_sass`: the widest load of the input tensor, the
  data the hot staging code streams (``global_load_bits``: ``LDG.E.128`` -> 128, ``LDG.E.U16`` -> 16,
  ``LDGSTS...128`` -> 128; the tap tables' 32-bit loads do not count), the widest input load inside the
  staging code (``staging_load_bits``), instructions per staged element, instructions per multiply-add,
  input loads in flight per warp, and whether tensor cores run (``HMMA`` / ``HGMMA`` present);
- from the plan: grid, block, dynamic shared memory, ``staged_over_unique`` and ``bytes_moved``.

Occupancy is computed from registers, threads per block and shared memory against the architecture's
limits (:data:`ARCHS`; the per-SM figures of the CUDA occupancy calculator: 64K registers allocated per warp
in units of 256, a warp and a block limit per SM, shared memory per SM with 1 KB reserved per block).

**The time model** (per launch, all terms in seconds; every device figure is a datasheet value or a stated
assumption, not a measurement)::

    t = max(t_mem, t_latency, t_issue, t_math, t_lds) + t_launch
    t_mem     = grid_factor * bytes_moved / copy_bw       (every staged byte counted at DRAM rate, halos too)
    t_latency = staged_bytes / (resident_warps * inflight_bytes_per_warp / dram_latency)
                (Little's law: the bytes a warp has in flight are the global loads of one iteration of its
                staging loop, 32 lanes x load width; resident_warps = min(CTAs, SMs * blocks_per_SM) x warps
                per CTA, blocks_per_SM from the occupancy)
    t_issue   = (staged_elements * instr_per_staged_element + MACs * instr_per_mac) / 32
                / (SMs * 4 schedulers * clock)            (one warp instruction per scheduler per cycle)
    t_math    = MACs / (SMs * 128 FP32 lanes * clock) on CUDA cores, 2 * MACs / tensor_peak with HMMA
    t_lds     = shared-memory wavefronts of the multiply-add loop / (SMs * clock)   (128 bytes per cycle)
    t_launch  = 2 us (kernel launch and ramp-up/tail; an assumption)

The throughput terms (mem, issue, math, lds) are whole-GPU rates, multiplied by ``grid_factor`` =
SMs * ceil(CTAs / SMs) / CTAs: CTAs are spread round-robin over the SMs, and the launch lasts as long as the
busiest SM, which runs ceil(CTAs / SMs) CTAs at 1/SMs of each rate (a 1-CTA launch gets 1/SMs of the copy
bandwidth, a grid of k * SMs CTAs all of it). ``waves`` = ceil(CTAs / (SMs * blocks_per_SM)): the rounds of
resident CTAs the grid needs (reported; the factor above already counts the tail of the last one).

``bytes_min`` = input + output + weights, each once (the roofline's bytes); ``roofline_us`` = bytes_min /
copy_bw; ``modelled_pct_copy_bw`` = 100 * roofline_us / modelled_us (above 100 only for a kernel that reads
less than the whole input: at stride 2 the DR kernel's im2col loads only the pixels its kept taps touch).
MACs are what the kernel executes: the kept taps (for a vectorised channels_last direct kernel, the union of
a vector's taps x its channels), ``group_size x K'_g`` (padded to the K tile) per output position for DR.

Input loads: global loads whose address derives from the kernel's first parameter (the input tensor), found
by a backward slice over the listing from the load's address registers to the constant bank; the tap tables
and weights come through other parameters. ``global_load_bits`` is the widest input load.

Instructions per staged element (the method): the *staging code* is the innermost loop (a backward ``BRA``
and its target) holding the widest input load, or, when staging is fully unrolled, the straight-line run from
the last label / branch / barrier before the first input load to the barrier after the last one; its
instruction count divided by the input elements its loads fetch (load bits / element bits, summed). The same
loads, 32 lanes x their width, are the bytes a warp has in flight (the latency term). Instructions per MAC:
the innermost loop with the most multiply-adds (``FFMA`` = 1 MAC per lane, ``HFMA2`` = 2, ``HMMA.16816`` =
2048 per warp), else the code after the last barrier.

Copy bandwidth assumptions: sm_90 = H100 SXM5 (HBM3 3.35 TB/s spec, 3.0 TB/s assumed sustained copy; an H200
has 4.8 TB/s spec, ~4.3 sustained: pass ``copy_tbps``), sm_80 = A100 SXM 80 GB (2.04 spec, 1.8 assumed).

The kernels package knows nothing of pruning beyond masks: the caller (``deprune kernels``) builds the model,
prunes it and collects the DW layers.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .formats import DRColumns
from .launch import ConvGeometry
from .plan import GPU_SMS, KernelPlan
from .sources import cuda_dir, specialize

# The launcher modules themselves (the package re-exports their functions under the same names).
_direct_mod = importlib.import_module(f"{__package__}.dw_direct")
_dr_mod = importlib.import_module(f"{__package__}.dw_dr")
_fused_mod = importlib.import_module(f"{__package__}.dw_pw_fused")

__all__ = ["ARCHS", "Arch", "DWLayer", "KERNELS", "SassStats", "analyze_sass", "compile_stats", "find_tool",
           "grid_occupancy",
           "kernel_plan", "kernel_report", "occupancy", "print_report", "ptxas_local_memory", "sass_local_instrs"]

#: Kernel variants the report knows: the two DW kernels and the fused DW + 1x1 pair (rows only for layers
#: with a fusable 1x1 conv after them, :attr:`DWLayer.pw_out`).
KERNELS = ("direct", "dr", "fused")
LAUNCH_FLOOR_S = 2e-6
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Arch:
    """Per-SM limits (CUDA occupancy calculator) and the device figures the time model assumes."""

    name: str
    device: str
    sms: int
    clock_ghz: float
    max_warps: int
    max_blocks: int
    regs: int
    smem_per_sm: int
    smem_optin: int
    copy_tbps: float
    dram_spec_tbps: float
    tensor_tflops: float
    param_base: int = 0x210
    dram_latency_us: float = 0.6


#: sm_90: H100 SXM5 (datasheet: 132 SMs, 1.98 GHz boost, HBM3 3.35 TB/s, 989.4 TFLOPS fp16 dense tensor);
#: sm_80: A100 SXM 80 GB (108 SMs, 1.41 GHz, 2.04 TB/s, 312 TFLOPS). copy_tbps: ~90% of spec, assumed.
ARCHS: dict[str, Arch] = {
    "sm_80": Arch("sm_80", "A100 SXM 80GB", GPU_SMS["sm_80"], 1.41, 64, 32, 65536, 164 * 1024, 163 * 1024, 1.8,
                  2.04, 312.0, param_base=0x160),
    "sm_90": Arch("sm_90", "H100 SXM5", GPU_SMS["sm_90"], 1.98, 64, 32, 65536, 228 * 1024, 227 * 1024, 3.0, 3.35,
                  989.4),
}


@dataclass(frozen=True)
class DWLayer:
    """One DW conv to report on: its name, the geometry of one call (``[n, c, h, w] -> [n, c, oh, ow]``,
    see :class:`.launch.ConvGeometry`) and the keep mask ``[C, 1, kh, kw]`` (bool).

    For the fused pair: ``pw_out`` the outputs of the 1x1 conv that alone reads this layer's output (0: none,
    e.g. an SE block in between; ``pw_note`` says why), ``act`` the DW activation, ``residual`` whether the
    pair's block adds its input to the 1x1 output."""

    name: str
    geometry: ConvGeometry
    keep: torch.Tensor
    pw_out: int = 0
    act: str = "identity"
    residual: bool = False
    pw_note: str = ""


# ---------------------------------------------------------------------------------------------- plans
def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _axis_staged(out: int, tile: int, stride: int, k: int, dil: int, pad: int, size: int) -> int:
    """Input rows (or columns) all tiles along one axis load, each tile's window clipped to the image."""
    total = 0
    for t0 in range(0, out, tile):
        t1 = min(t0 + tile, out)
        lo = t0 * stride - pad
        hi = (t1 - 1) * stride - pad + (k - 1) * dil + 1
        total += max(0, min(hi, size) - max(lo, 0))
    return total


def _tap_bytes(keep: torch.Tensor) -> int:
    c = keep.shape[0]
    return 4 * (c + 1) + 8 * int(keep.sum())  # tap_ptr int32, tap_idx int32 + tap_val fp32 per kept tap


def _derived_direct_plan(g: ConvGeometry, dtype: torch.dtype, keep: torch.Tensor, smem_limit: int) -> KernelPlan:
    """Today's ``dw_direct`` launch for ``g`` (its planner :func:`.dw_direct.plan_tile`), as a KernelPlan."""
    block, tile_h, tile_w, smem = _direct_mod.plan_tile(g, smem_limit)
    grid_y = math.ceil(g.c / block[0]) if g.nhwc else g.c
    grid = (math.ceil(g.oh / tile_h) * math.ceil(g.ow / tile_w), grid_y, g.n)
    eb = _elem_bytes(dtype)
    rows = _axis_staged(g.oh, tile_h, g.sh, g.kh, g.dh, g.pad[0], g.h)
    cols = _axis_staged(g.ow, tile_w, g.sw, g.kw, g.dw, g.pad[2], g.w)
    staged = g.n * g.c * rows * cols * eb
    unique = g.n * g.c * g.h * g.w * eb
    out = g.n * g.c * g.oh * g.ow * eb
    return KernelPlan("direct", "dw_direct.cu", "deprune_dw_direct", _direct_mod.dw_direct_defines(dtype, g.nhwc),
                      grid, block, smem, staged, unique, staged + out + _tap_bytes(keep) + 4 * g.c)


def _derived_dr_plan(g: ConvGeometry, dtype: torch.dtype, cols: DRColumns) -> KernelPlan:
    """Today's ``dw_dr`` launch for ``g``: 16 x 16 threads, 64 output positions per CTA, one CTA row per
    balanced range; every column (padding included) gathers its input for each position (im2col)."""
    positions = 16 * _dr_mod.POSITIONS_PER_THREAD
    grid = (math.ceil(g.oh * g.ow / positions), cols.num_ranges, g.n)
    eb = _elem_bytes(dtype)
    inside = {}
    for tap in range(g.kh * g.kw):
        ki, kj = divmod(tap, g.kw)
        rows = sum(0 <= oy * g.sh - g.pad[0] + ki * g.dh < g.h for oy in range(g.oh))
        cw = sum(0 <= ox * g.sw - g.pad[2] + kj * g.dw < g.w for ox in range(g.ow))
        inside[tap] = rows * cw
    staged = g.n * eb * sum(inside[int(t)] for t in cols.col_tap.tolist())
    unique = g.n * g.c * g.h * g.w * eb
    out = g.n * g.c * g.oh * g.ow * eb
    weights = 4 * (cols.num_ranges + 1) + 12 * cols.num_columns + 4 * cols.num_ranges
    defines = _dr_mod.dw_dr_defines(dtype, g.nhwc, cols.group_size, cols.tile)
    return KernelPlan("dr", "dw_dr.cu", "deprune_dw_dr", defines, grid, (16, 16, 1), 0, staged, unique,
                      staged + out + weights + 4 * g.c)


def kernel_plan(kernel: str, layer: DWLayer, dtype: torch.dtype, arch: Arch, group_size: int = 32,
                tile: int = 32) -> KernelPlan:
    """The :class:`.plan.KernelPlan` of ``kernel`` for ``layer``: the launcher's own ``dw_*_plan`` when the
    kernels package has one (``dw_direct_plan(g, dtype, *, smem_limit, sms)``, ``dw_dr_plan(g, dtype, cols, *,
    smem_limit, sms)``, sized for ``arch``'s SMs), else derived from today's launcher and its planner."""
    g = layer.geometry
    if kernel == "direct":
        planner = getattr(_direct_mod, "dw_direct_plan", None)
        if planner is not None:
            return planner(g, dtype, smem_limit=arch.smem_optin, sms=arch.sms)
        return _derived_direct_plan(g, dtype, layer.keep, arch.smem_optin)
    if kernel == "dr":
        cols = DRColumns.from_dense(layer.keep.float(), layer.keep, group_size=group_size, tile=tile)
        planner = getattr(_dr_mod, "dw_dr_plan", None)
        if planner is not None:
            return planner(g, dtype, cols, smem_limit=arch.smem_optin, sms=arch.sms)
        return _derived_dr_plan(g, dtype, cols)
    if kernel == "fused":
        if not layer.pw_out:
            raise ValueError(f"{layer.name} has no fusable 1x1 conv after it ({layer.pw_note or 'pw_out is 0'})")
        return _fused_mod.dw_pw_fused_plan(g, layer.pw_out, dtype, smem_limit=arch.smem_optin, act=layer.act,
                                           residual=layer.residual, kept_taps=int(layer.keep.sum()), sms=arch.sms)
    raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")


def _macs(kernel: str, layer: DWLayer, plan: KernelPlan, group_size: int, tile: int) -> int:
    """Multiply-adds the kernel executes, not only the useful ones: DR multiplies the zeros of its sub-GEMM
    (``group_size`` x the range's columns, padded to the K tile, per output position); a channels_last
    direct kernel with ``DEPRUNE_VEC`` channels per vector runs a tap for the whole vector when any of its
    channels keeps it (its launcher's docstring), so it executes the union of the vector's taps x VEC."""
    g = layer.geometry
    if kernel == "dr":
        cols = plan.extra.get("columns")
        if cols is None:
            d = DRColumns.from_dense(layer.keep.float(), layer.keep, group_size=group_size, tile=tile)
            cols = d.num_columns
        return g.n * g.oh * g.ow * group_size * int(cols)
    vec = int(plan.defines.get("DEPRUNE_VEC", 1)) if g.nhwc else 1
    if kernel == "fused":  # 16-byte channel vectors, like the channels_last direct kernel; plus the 1x1 GEMM
        vec = 16 // _elem_bytes(_dtype_of(plan))
    keep = layer.keep.reshape(g.c, -1)
    if vec > 1:
        pad = -g.c % vec
        keep = torch.cat([keep, keep.new_zeros(pad, keep.shape[1])]) if pad else keep
        executed = int(keep.reshape(-1, vec, keep.shape[1]).any(dim=1).sum()) * vec
    else:
        executed = int(keep.sum())
    return g.n * g.oh * g.ow * executed + int(plan.extra.get("pw_macs", 0))


def _dtype_of(plan: KernelPlan) -> torch.dtype:
    return {"float": torch.float32, "__half": torch.float16, "__nv_bfloat16": torch.bfloat16}[
        str(plan.defines["DEPRUNE_SCALAR"])]


# ---------------------------------------------------------------------------------------------- tools
def find_tool(name: str) -> str | None:
    """Path of a CUDA toolkit binary (``nvcc``, ``cuobjdump``, ``nvdisasm``): ``$PATH``, next to nvcc's real
    path, ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda`` ``bin/``, or the copy the Triton wheel bundles."""
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(os.path.realpath(nvcc)).parent)
    dirs += [Path(r) / "bin" for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
             if r]
    spec = importlib.util.find_spec("triton")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "backends" / "nvidia" / "bin" for p in spec.submodule_search_locations]
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def _cache_dir() -> Path:
    env = os.environ.get("DEPRUNE_REPORT_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "deprune_report_cache"


@dataclass(frozen=True)
class CompileStats:
    """What ptxas and cuobjdump say about one entry of one specialisation."""

    registers: int
    spill_bytes: int
    static_smem: int
    sass: str
    #: ptxas's "bytes stack frame": local memory the kernel keeps (e.g. an array indexed at run time), which
    #: costs the same LDL/STL traffic as a spill but is not counted in ``spill_bytes``
    stack_bytes: int = 0
    #: LDL/STL instructions in the SASS (any local-memory access, whatever ptxas calls it)
    local_instrs: int = 0

    @property
    def local_memory(self) -> bool:
        """Whether the kernel touches local memory at all: spills, a stack frame or LDL/STL in its SASS. Every
        kernel of the project must keep this False (its accumulators and tap sums belong in registers)."""
        return bool(self.spill_bytes or self.stack_bytes or self.local_instrs)


_LOCAL_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(?:LDL|STL)\b")
_PTXAS_FRAME = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                          r"stores, (\d+) bytes spill loads")


def ptxas_local_memory(log: str) -> dict[str, tuple[int, int, int]]:
    """``{function: (stack frame bytes, spill store bytes, spill load bytes)}`` from an ``-Xptxas -v`` log. A
    spill check must look at all three: an array indexed at run time lives in the stack frame with 0 spill
    bytes reported, yet every access is an LDL/STL."""
    return {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in _PTXAS_FRAME.finditer(log)}


def sass_local_instrs(sass: str) -> int:
    """LDL/STL (local-memory load/store) instructions in ``cuobjdump -sass`` output."""
    return len(_LOCAL_INSTR.findall(sass))


def compile_stats(code: str, entry: str, arch: str, nvcc: str | None = None) -> CompileStats:
    """Compile ``code`` (a specialised, self-contained source) to a cubin for ``arch`` and read ``entry``'s
    registers, spills, static shared memory and SASS. Cached on disk (``$DEPRUNE_REPORT_CACHE``, default
    ``<tmp>/deprune_report_cache``) by (code, arch, nvcc binary)."""
    nvcc = nvcc or find_tool("nvcc")
    cuobjdump = find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("the kernel report needs nvcc and cuobjdump (CUDA toolkit; cuobjdump also ships in "
                           "the triton wheel)")
    real = os.path.realpath(nvcc)  # another toolkit (a new nvcc at the same path) is another key
    key = hashlib.sha256(f"{arch}\0{real}\0{os.stat(real).st_mtime_ns}\0{code}".encode()).hexdigest()[:24]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cubin, log_path = folder / f"{key}.cubin", folder / f"{key}.ptxas.txt"
    if not (cubin.is_file() and log_path.is_file()):
        with tempfile.TemporaryDirectory() as tmp:
            cu = Path(tmp) / "kernel.cu"
            cu.write_text(code)
            cmd = [nvcc, "-x", "cu", "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o",
                   str(Path(tmp) / "k.cubin"), str(cu)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            (Path(tmp) / "k.cubin").replace(cubin)
            log_path.write_text(proc.stdout + proc.stderr)
    log = log_path.read_text()
    stack, spill_st, spill_ld = ptxas_local_memory(log).get(entry, (0, 0, 0))
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(entry)}:\s*\n\s*REG:(\d+)\s+STACK:\d+\s+SHARED:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage shows no function {entry}:\n{res}")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    text = _function_sass(sass, entry)
    return CompileStats(int(m.group(1)), spill_st + spill_ld, int(m.group(2)), text, stack, sass_local_instrs(text))


def _function_sass(sass: str, entry: str) -> str:
    start = sass.find(f"Function : {entry}\n")
    if start < 0:
        raise RuntimeError(f"no SASS for {entry}")
    end = sass.find("Function : ", start + 1)
    return sass[start:end if end > 0 else len(sass)]


# ---------------------------------------------------------------------------------------------- SASS
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass(frozen=True)
class Instr:
    addr: int
    op: str
    operands: str


def parse_sass(sass: str) -> list[Instr]:
    """Instructions of one function's ``cuobjdump -sass`` text (address, opcode with modifiers, operands)."""
    return [Instr(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(sass)]


def _load_bits(op: str) -> int | None:
    """Width of a global load (``LDG``, ``LDGSTS``), None for anything else."""
    base, *mods = op.split(".")
    if base not in ("LDG", "LDGSTS"):
        return None
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return bits
    return 32


def _lds_cycles(op: str) -> float:
    """Shared-memory cycles (128-byte wavefronts) of one warp-wide load from shared memory."""
    base, *mods = op.split(".")
    if base == "LDSM":
        return 4.0 if "X4" in mods or "4" in mods else 2.0 if "X2" in mods or "2" in mods else 1.0
    if base != "LDS":
        return 0.0
    return 4.0 if "128" in mods else 2.0 if "64" in mods else 1.0


def _macs_per_warp(op: str) -> int:
    base, *mods = op.split(".")
    if base == "FFMA":
        return 32
    if base == "HFMA2" and "MMA" not in mods:  # HFMA2.MMA RZ, RZ moves a constant: no math
        return 64
    if base == "HMMA":
        for mod in mods:
            if mod.isdigit() and len(mod) >= 4:  # 16816 -> 16*8*16, 1688 -> 16*8*8
                m, n, k = int(mod[:2]), int(mod[2]), int(mod[3:])
                return m * n * k
        return 2048
    if base == "HGMMA":
        for mod in mods:
            dims = re.fullmatch(r"(\d+)X(\d+)X(\d+)", mod.upper())
            if dims:
                return math.prod(int(d) for d in dims.groups()) // 4  # a warpgroup instruction, per warp
        return 64 * 64 * 16 // 4
    return 0


@dataclass(frozen=True)
class SassStats:
    """What :func:`analyze_sass` reads from one function's SASS (see the module docstring for the method)."""

    instructions: int
    global_load_bits: int
    staging_load_bits: int
    staging_instructions: int
    staging_elements: float
    staging_loads: int
    staging_load_bytes_per_warp: int
    mac_instructions: int
    macs_per_warp_iteration: int
    lds_cycles_per_iteration: float
    tensor_cores: bool
    loops: int
    # the same three per kind of multiply-add (a fused pair runs both): the innermost loop with the most
    # CUDA-core MACs (FFMA / HFMA2) and the one with the most tensor-core MACs (HMMA / HGMMA)
    cc_loop: tuple[int, int, float] = (0, 0, 0.0)
    tc_loop: tuple[int, int, float] = (0, 0, 0.0)

    @property
    def instr_per_staged_element(self) -> float:
        return self.staging_instructions / self.staging_elements if self.staging_elements else float("nan")

    @property
    def instr_per_mac(self) -> float:
        """Warp instructions per MAC of one lane (i.e. x 32 lanes = per-thread instructions per MAC)."""
        return 32 * self.mac_instructions / self.macs_per_warp_iteration if self.macs_per_warp_iteration else 0.0


_CONST = re.compile(r"c\[0x0\]\[0x([0-9a-f]+)\]")
_REG = re.compile(r"\b(U?R)(\d+)(\.64)?\b")
_DESC = re.compile(r"desc\[[^\]]*\]")


def _regs(text: str) -> set[str]:
    """Registers an operand text names (a ``.64`` operand names a pair); ``RZ`` / ``URZ`` are not registers."""
    out = set()
    for kind, num, wide in _REG.findall(text):
        out.add(f"{kind}{num}")
        if wide:
            out.add(f"{kind}{int(num) + 1}")
    return out


def _dest(i: Instr) -> set[str]:
    """Registers an instruction writes: its first operand (two for 64-bit results)."""
    first = i.operands.split(",")[0].strip()
    m = re.fullmatch(r"(U?R)(\d+)", first)
    if not m:
        return set()
    regs = {first}
    if "WIDE" in i.op.split(".") or "64" in i.op.split(".")[1:]:
        regs.add(f"{m.group(1)}{int(m.group(2)) + 1}")
    return regs


def _reads_param(ins: list[Instr], n: int, param: int, max_steps: int = 4000) -> bool:
    """Whether the address of the global load ``ins[n]`` is computed from the kernel parameter at constant-bank
    offset ``param`` (a pointer: its two 32-bit halves). A backward slice over the listing order: registers the
    address needs are followed to the instructions that write them (loops are not followed around)."""
    address = _DESC.sub("", ins[n].operands)
    address = address[address.rfind("[") + 1:]  # the global address (LDGSTS names its shared one first)
    need = _regs(address)
    halves = {param, param + 4}
    for m in range(n - 1, max(-1, n - max_steps), -1):
        if not need:
            return False
        writes = _dest(ins[m]) & need
        if not writes:
            continue
        sources = ins[m].operands.split(",", 1)[1] if "," in ins[m].operands else ""
        if any(int(c, 16) in halves for c in _CONST.findall(sources)):
            return True
        need = (need - writes) | _regs(_DESC.sub("", sources))
    return False


def _is_tc(i: Instr) -> bool:
    """Whether ``i`` is a tensor-core multiply-add (``HMMA`` / ``HGMMA``)."""
    return i.op.split(".")[0] in ("HMMA", "HGMMA")


def _boundary(i: Instr, targets: set[int]) -> bool:
    return i.addr in targets or i.op.split(".")[0] in ("BAR", "BRA", "EXIT")


def analyze_sass(sass: str, elem_bits: int, input_param: int | None = 0x210) -> SassStats:
    """Loops, global-load widths, instructions per staged element and per MAC of one function's SASS.

    ``elem_bits``: bits of one staged input element (16 for fp16/bf16, 32 for fp32). ``input_param``: the
    constant-bank offset of the kernel's input pointer (its first parameter: ``0x210`` on sm_90, ``0x160`` on
    sm_70-sm_89); global loads whose address derives from it are the *input loads* (the tap tables and weights
    are other parameters). None: every global load counts as an input load (hand-made listings in tests)."""
    ins = parse_sass(sass)
    if not ins:
        raise ValueError("no instructions in the SASS text")
    index = {i.addr: n for n, i in enumerate(ins)}
    loops, targets = [], set()
    for n, i in enumerate(ins):
        if i.op.split(".")[0] == "BRA":
            m = _BRA_TARGET.search(i.operands)
            if m:
                targets.add(int(m.group(1), 16))
            if m and int(m.group(1), 16) < i.addr and int(m.group(1), 16) in index:  # (== : the trailing trap)
                loops.append((index[int(m.group(1), 16)], n))
    innermost = [(a, b) for a, b in loops if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in loops)]
    tensor = any(i.op.split(".")[0] in ("HMMA", "HGMMA") for i in ins)
    loads = [n for n, i in enumerate(ins) if _load_bits(i.op)]
    inputs = [n for n in loads if input_param is None or _reads_param(ins, n, input_param)] or loads
    widest = max((_load_bits(ins[n].op) or 0 for n in inputs), default=0)

    # the staging code: the innermost loop holding the widest input load, else (unrolled) the straight-line
    # run around the input loads, from the last label / branch / barrier before the first one to the first
    # barrier after the last one
    main = [n for n in inputs if _load_bits(ins[n].op) == widest]
    loop = next(((a, b) for a, b in sorted(innermost, key=lambda ab: ab[1] - ab[0]) if any(a <= n <= b for n in main)),
                None)
    if loop is not None:
        lo, hi = loop
    else:
        first, last = min(inputs), max(inputs)
        lo = next((m + (ins[m].addr not in targets) for m in range(first - 1, -1, -1)
                   if _boundary(ins[m], targets)), 0)  # a label starts the run, a branch / barrier ends the last
        hi = next((m - 1 for m in range(last + 1, len(ins)) if ins[m].op.startswith("BAR")), len(ins) - 1)
    staged = [_load_bits(ins[n].op) for n in inputs if lo <= n <= hi]
    count = hi - lo + 1
    elements = sum(bits / elem_bits for bits in staged)

    # multiply-adds: the innermost loop with the most MACs per iteration, else the code after the last barrier
    # before the last multiply-add
    best = None
    for a, b in innermost:
        ops = ins[a:b + 1]
        macs = sum(_macs_per_warp(i.op) for i in ops)
        if macs and (best is None or macs > best[0]):
            best = (macs, len(ops), sum(_lds_cycles(i.op) for i in ops))
    per_kind = {}
    for kind, tensor_op in (("cc", False), ("tc", True)):
        for a, b in innermost:
            ops = ins[a:b + 1]
            macs = sum(_macs_per_warp(i.op) for i in ops if _is_tc(i) == tensor_op)
            if macs and (kind not in per_kind or macs > per_kind[kind][0]):
                per_kind[kind] = (macs, len(ops), sum(_lds_cycles(i.op) for i in ops))
    hmma = [n for n, i in enumerate(ins) if i.op.split(".")[0] in ("HMMA", "HGMMA")]
    if hmma and "tc" not in per_kind:  # tensor-core steps not in a loop (one K step per chunk): their barrier region
        lo = max((n for n, i in enumerate(ins[:hmma[0]]) if i.op.startswith("BAR")), default=-1) + 1
        hi = next((n for n in range(hmma[-1], len(ins)) if ins[n].op.startswith("BAR")), len(ins))
        ops = ins[lo:hi]
        per_kind["tc"] = (sum(_macs_per_warp(i.op) for i in ops if _is_tc(i)), len(ops),
                          sum(_lds_cycles(i.op) for i in ops))
    if best is None:
        bars = [n for n, i in enumerate(ins) if i.op.startswith("BAR")]
        post = ins[bars[-1] if bars else 0:]
        best = (sum(_macs_per_warp(i.op) for i in post), len(post), sum(_lds_cycles(i.op) for i in post))
    return SassStats(len(ins), widest, max(staged, default=0), count, elements, len(staged),
                     sum(staged) * 32 // 8, best[1], best[0], best[2], tensor, len(loops),
                     per_kind.get("cc", (0, 0, 0.0)), per_kind.get("tc", (0, 0, 0.0)))


# ---------------------------------------------------------------------------------------------- model
def occupancy(arch: Arch, threads: int, registers: int, smem_bytes: int) -> dict[str, Any]:
    """Active blocks and warps per SM, and the limiter, for a block of ``threads`` using ``registers`` per
    thread and ``smem_bytes`` (static + dynamic) per block."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    limits = {"warps": arch.max_warps // warps, "blocks": arch.max_blocks,
              "registers": (arch.regs // regs_per_warp) // warps,
              "shared_memory": arch.smem_per_sm // (smem_bytes + 1024) if smem_bytes else arch.max_blocks}
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / arch.max_warps,
            "limiter": limiter}


def grid_occupancy(arch: Arch, ctas: int, blocks_per_sm: int) -> dict[str, Any]:
    """How a grid of ``ctas`` CTAs fills ``arch``'s SMs at ``blocks_per_sm`` resident CTAs per SM: ``waves`` =
    ceil(ctas / (SMs * blocks_per_sm)) and ``grid_factor`` = SMs * ceil(ctas / SMs) / ctas, the factor on the
    time of the model's whole-GPU throughput terms (1: every SM runs the same number of CTAs; SMs: one CTA)."""
    if ctas < 1:
        raise ValueError(f"a launch has at least one CTA, got {ctas}")
    return {"waves": -(-ctas // (arch.sms * max(blocks_per_sm, 1))),
            "grid_factor": arch.sms * -(-ctas // arch.sms) / ctas}


def _model(arch: Arch, plan: KernelPlan, stats: SassStats, occ: dict, macs: int, elem_bytes: int,
           bytes_min: int, tensor_cores: bool, tc_macs: int | None = None) -> dict[str, float]:
    clock = arch.clock_ghz * 1e9
    staged_elements = plan.staged_bytes / elem_bytes
    grid = grid_occupancy(arch, plan.ctas, occ["blocks_per_sm"])
    t_mem = grid["grid_factor"] * plan.bytes_moved / (arch.copy_tbps * 1e12)
    inflight = max(stats.staging_load_bytes_per_warp, 1)
    warps_per_cta = max(occ["warps_per_sm"] // max(occ["blocks_per_sm"], 1), 1)
    resident_warps = min(plan.ctas, arch.sms * max(occ["blocks_per_sm"], 1)) * warps_per_cta
    lat_bw = resident_warps * inflight / (arch.dram_latency_us * 1e-6)
    t_lat = plan.staged_bytes / lat_bw
    ipe = stats.instr_per_staged_element if stats.staging_elements else 0.0
    if tc_macs is not None:  # a fused pair: DW MACs at the CUDA-core loop's cost, 1x1 MACs at the MMA loop's
        loops = [(macs - tc_macs, stats.cc_loop), (tc_macs, stats.tc_loop if stats.tc_loop[0] else stats.cc_loop)]
        per_loop = [(m / loop[0] if loop[0] else 0.0, loop) for m, loop in loops]
        warp_instr = staged_elements * ipe / 32 + sum(it * loop[1] for it, loop in per_loop)
        lds = sum(it * loop[2] for it, loop in per_loop)
    else:
        iterations = macs * 32 / stats.macs_per_warp_iteration / 32 if stats.macs_per_warp_iteration else 0.0
        warp_instr = staged_elements * ipe / 32 + iterations * stats.mac_instructions
        lds = iterations * stats.lds_cycles_per_iteration
    t_issue = grid["grid_factor"] * warp_instr / (arch.sms * 4 * clock)
    if tc_macs is not None:  # a fused pair: the DW taps on CUDA cores, the 1x1 GEMM on tensor cores (or not)
        tc = tc_macs if tensor_cores else 0
        t_math = (macs - tc) / (arch.sms * 128 * clock) + 2 * tc / (arch.tensor_tflops * 1e12)
    else:
        t_math = 2 * macs / (arch.tensor_tflops * 1e12) if tensor_cores else macs / (arch.sms * 128 * clock)
    t_math *= grid["grid_factor"]
    t_lds = grid["grid_factor"] * lds / (arch.sms * clock)
    terms = {"mem": t_mem, "latency": t_lat, "issue": t_issue, "math": t_math, "lds": t_lds}
    t = max(terms.values()) + LAUNCH_FLOOR_S
    roof = bytes_min / (arch.copy_tbps * 1e12)
    return {"modelled_us": t * 1e6, "roofline_us": roof * 1e6, "modelled_pct_copy_bw": 100 * roof / t,
            "ctas": plan.ctas, "waves": grid["waves"], "grid_factor": grid["grid_factor"],
            "bound": max(terms, key=lambda k: terms[k]), **{f"t_{k}_us": v * 1e6 for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------------- report
def kernel_report(layers: Sequence[DWLayer], arch: str = "sm_90", dtype: torch.dtype | str = torch.float16,
                  kernels: Iterable[str] = KERNELS, *, group_size: int = 32, tile: int = 32,
                  nvcc: str | None = None, copy_tbps: float | None = None, progress: bool = True) -> dict:
    """The static report of ``kernels`` over ``layers`` for ``arch`` (a key of :data:`ARCHS`).

    Returns ``{"arch", "device", "batch", "dtype", "assumptions", "cuda_dir", "layers": [row, ...],
    "summary"}``; one row per (layer, kernel) with ``layer``, ``kernel``, ``geometry``, ``kept_taps``,
    ``grid``, ``block``, ``smem_bytes``, ``registers``, ``spills``, ``stack_frame_bytes``, ``local_instrs``,
    ``ctas``, ``waves``, ``grid_factor``, ``allowed_ctas`` (the most CTAs a plan of the kernel has for the call),
    ``occupancy``, ``global_load_bits``,
    ``instr_per_staged_element``, ``instr_per_mac``, ``staged_over_unique``, ``bytes_moved``, ``bytes_min``,
    ``tensor_cores``, ``modelled_us``, ``roofline_us``, ``modelled_pct_copy_bw``, ``bound`` (and
    ``bytes_moved_unfused`` for fused rows). ``summary`` per kernel: the layers' summed roofline over their
    summed modelled time, in percent."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    a = ARCHS[arch]
    if copy_tbps is not None:
        a = Arch(**{**asdict(a), "copy_tbps": float(copy_tbps)})
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    eb = _elem_bytes(dtype)
    kernels = tuple(kernels)
    plans = [(layer, k, kernel_plan(k, layer, dtype, a, group_size, tile)) for layer in layers for k in kernels
             if k != "fused" or layer.pw_out]
    sources: dict[tuple[str, str], str] = {}  # (source hash, entry) -> code: each define set compiled once
    specs = {}
    for _, _, plan in plans:
        src = specialize(plan.source, plan.defines)
        specs[id(plan)] = (src.hash, plan.entry)
        sources.setdefault((src.hash, plan.entry), src.code)
    compiled: dict[tuple[str, str], CompileStats] = {}
    analysed: dict[tuple[str, str], SassStats] = {}
    for key, code in _progress(list(sources.items()), progress, "compiling"):
        compiled[key] = compile_stats(code, key[1], arch, nvcc)
        analysed[key] = analyze_sass(compiled[key].sass, 8 * eb, a.param_base)
    rows = []
    for layer, k, plan in plans:
        g = layer.geometry
        key = specs[id(plan)]
        cs, ss = compiled[key], analysed[key]
        threads = math.prod(plan.block)
        occ = occupancy(a, threads, cs.registers, cs.static_smem + plan.smem_bytes)
        macs = _macs(k, layer, plan, group_size, tile)
        if k == "fused":  # input once, the 1x1 output (and the residual) once, both weights
            out_bytes = g.n * layer.pw_out * g.oh * g.ow * eb * (2 if layer.residual else 1)
            weights = plan.bytes_moved - plan.staged_bytes - out_bytes
            bytes_min = plan.unique_bytes + out_bytes + max(weights, 0)
        else:
            weights = plan.bytes_moved - plan.staged_bytes - g.n * g.c * g.oh * g.ow * eb
            bytes_min = plan.unique_bytes + g.n * g.c * g.oh * g.ow * eb + max(weights, 0)
        row = {
            "layer": layer.name, "kernel": k,
            "geometry": {"n": g.n, "c": g.c, "h": g.h, "w": g.w, "oh": g.oh, "ow": g.ow, "k": [g.kh, g.kw],
                         "stride": [g.sh, g.sw], "pad": list(g.pad), "nhwc": g.nhwc},
            "kept_taps": int(layer.keep.sum()), "taps": int(layer.keep.numel()),
            "defines": {str(kk): str(v) for kk, v in plan.defines.items()},
            "grid": list(plan.grid), "block": list(plan.block), "smem_bytes": plan.smem_bytes,
            "static_smem_bytes": cs.static_smem, "registers": cs.registers, "spills": cs.spill_bytes,
            "stack_frame_bytes": cs.stack_bytes, "local_instrs": cs.local_instrs,
            "allowed_ctas": plan.extra.get("allowed_ctas"),
            "occupancy": round(occ["occupancy"], 3), "occupancy_limiter": occ["limiter"],
            "global_load_bits": ss.global_load_bits, "staging_load_bits": ss.staging_load_bits,
            "instr_per_staged_element": round(ss.instr_per_staged_element, 2),
            "instr_per_mac": round(ss.instr_per_mac, 2),
            "loads_in_flight_per_warp": ss.staging_loads,
            "staged_over_unique": round(plan.staged_over_unique, 3),
            "bytes_moved": int(plan.bytes_moved), "bytes_min": int(bytes_min), "macs": int(macs),
            "tensor_cores": bool(ss.tensor_cores or plan.tensor_cores),
        }
        tc_macs = int(plan.extra["pw_macs"]) if k == "fused" else None
        row.update({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in
                    _model(a, plan, ss, occ, macs, eb, bytes_min, row["tensor_cores"], tc_macs).items()})
        if k == "fused":
            row.update(_fused_fields(plan, layer, a))
        rows.append(row)
    summary = {}
    for k in kernels:
        rs = [r for r in rows if r["kernel"] == k]
        if rs:
            t = sum(r["modelled_us"] for r in rs)
            roof = sum(r["roofline_us"] for r in rs)
            summary[k] = {"modelled_us": round(t, 2), "roofline_us": round(roof, 2),
                          "modelled_pct_copy_bw": round(100 * roof / t, 1)}
            if k == "fused":
                moved = sum(r["bytes_moved"] for r in rs)
                for key in ("bytes_moved_unfused", "bytes_moved_layer"):
                    total = sum(r[key] for r in rs)
                    summary[k][key] = total
                    summary[k][key.replace("bytes_moved", "fused_over")] = round(moved / total, 3)
                summary[k]["bytes_moved"] = moved
                summary[k]["modelled_unfused_us"] = round(sum(r["modelled_unfused_us"] for r in rs), 2)
    left = [{"layer": la.name, "reason": la.pw_note or "no fusable 1x1 conv after it"}
            for la in layers if "fused" in kernels and not la.pw_out]
    return {
        "arch": arch, "device": a.device, "batch": layers[0].geometry.n if layers else 0,
        "dtype": str(dtype).replace("torch.", ""), "cuda_dir": str(cuda_dir()),
        "assumptions": {"copy_tbps": a.copy_tbps, "dram_spec_tbps": a.dram_spec_tbps, "sms": a.sms,
                        "clock_ghz": a.clock_ghz, "tensor_tflops": a.tensor_tflops,
                        "dram_latency_us": a.dram_latency_us, "launch_floor_us": LAUNCH_FLOOR_S * 1e6,
                        "limits": {"max_warps_per_sm": a.max_warps, "max_blocks_per_sm": a.max_blocks,
                                   "registers_per_sm": a.regs, "smem_per_sm": a.smem_per_sm,
                                   "smem_per_block_optin": a.smem_optin},
                        "model": "t = max(f*bytes_moved/copy_bw, staged/(resident_warps*inflight/latency), "
                                 "f*warp_instr/(SMs*4*clock), f*MACs/peak, f*LDS wavefronts/(SMs*clock)) + launch "
                                 "floor; f = SMs*ceil(CTAs/SMs)/CTAs, resident_warps = min(CTAs, SMs*blocks_per_SM)"
                                 "*warps_per_CTA"},
        "layers": rows, "summary": summary, "unfused_layers": left,
    }


def _fused_fields(plan: KernelPlan, layer: DWLayer, arch: Arch) -> dict[str, Any]:
    """A fused row's extras: the pair's bytes unfused (eager BN-folded; perfect epilogues), the modelled time
    of the unfused pair (its bytes at copy bandwidth plus a launch floor per kernel: DW, [activation], 1x1,
    [residual add]), and the tiling."""
    kernels = 2 + (layer.act != "identity") + bool(layer.residual)
    unfused = int(plan.extra["bytes_moved_unfused"])
    return {"pw_out": layer.pw_out, "residual": bool(layer.residual), "act": layer.act,
            "bytes_moved_unfused": unfused, "bytes_moved_layer": int(plan.extra["bytes_moved_layer"]),
            "fused_over_unfused": round(plan.bytes_moved / unfused, 3),
            "modelled_unfused_us": round((unfused / (arch.copy_tbps * 1e12) + kernels * LAUNCH_FLOOR_S) * 1e6, 3),
            "dw_recompute": int(plan.extra["dw_recompute"]), "tile": list(plan.extra["tile"]),
            "chunk": int(plan.extra["chunk"]), "out_block": int(plan.extra["out_block"])}


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    return tqdm(items, desc=desc, unit="variant", leave=False, disable=None)


_COLUMNS = [("layer", "layer", 18, "s"), ("kernel", "kern", 6, "s"), ("c", "C", 5, "d"), ("hw", "HxW", 9, "s"),
            ("s", "s", 2, "d"), ("kept", "taps", 5, "s"), ("registers", "regs", 4, "d"), ("spills", "spill", 5, "d"),
            ("stack_frame_bytes", "stack", 5, "d"), ("ctas", "CTAs", 6, "d"), ("waves", "waves", 5, "d"),
            ("occupancy", "occ", 5, ".2f"), ("global_load_bits", "ldg", 4, "d"),
            ("staging_load_bits", "stg", 4, "d"),
            ("instr_per_staged_element", "ins/el", 6, ".1f"), ("staged_over_unique", "st/u", 5, ".2f"),
            ("bytes_moved", "MB", 7, ".1f"), ("tensor_cores", "TC", 3, "s"), ("modelled_us", "us", 8, ".1f"),
            ("roofline_us", "roof", 7, ".1f"), ("modelled_pct_copy_bw", "%bw", 5, ".1f"), ("bound", "bound", 7, "s")]


def format_report(report: dict) -> str:
    """The report as a text table (one line per row) followed by the per-kernel summary."""
    head = " ".join(f"{title:>{w}}" if f != "s" else f"{title:<{w}}" for _, title, w, f in _COLUMNS)
    lines = [f"{report['arch']} ({report['device']}, copy bandwidth {report['assumptions']['copy_tbps']} TB/s "
             f"assumed), batch {report['batch']}, {report['dtype']}", head]
    for r in report["layers"]:
        g = r["geometry"]
        vals = {**r, "c": g["c"], "hw": f"{g['h']}x{g['w']}", "s": g["stride"][0], "kept": f"{r['kept_taps']}",
                "bytes_moved": r["bytes_moved"] / 1e6, "tensor_cores": "y" if r["tensor_cores"] else "n"}
        cells = []
        for key, _, w, f in _COLUMNS:
            v = vals[key]
            cells.append(f"{str(v)[:w]:<{w}}" if f == "s" else f"{v:>{w}{f}}")
        lines.append(" ".join(cells))
    for k, s in report["summary"].items():
        lines.append(f"{k}: modelled {s['modelled_us']:.1f} us vs roofline {s['roofline_us']:.1f} us over "
                     f"{sum(r['kernel'] == k for r in report['layers'])} layers = {s['modelled_pct_copy_bw']:.1f}% of "
                     "copy bandwidth")
        if k == "fused":
            lines.append(f"fused pairs move {s['bytes_moved'] / 1e6:.1f} MB vs {s['bytes_moved_unfused'] / 1e6:.1f} MB "
                         f"unfused (eager, BN folded) = {s['fused_over_unfused']:.3f} (goal <= 0.333); vs "
                         f"{s['bytes_moved_layer'] / 1e6:.1f} MB with perfect epilogues = {s['fused_over_layer']:.3f}; "
                         f"modelled {s['modelled_us']:.1f} us vs {s['modelled_unfused_us']:.1f} us unfused")
    for la in report.get("unfused_layers", []):
        lines.append(f"not fused: {la['layer']}: {la['reason']}")
    return "\n".join(lines)


def print_report(report: dict, out: Callable[[str], Any] = print) -> None:
    """Print :func:`format_report`."""
    out(format_report(report))


# ---------------------------------------------------------------------------------------------- files
def save_layers(layers: Sequence[DWLayer], path: str | os.PathLike) -> None:
    """Write ``layers`` (geometries and keep masks) to a ``torch.save`` file, so another checkout's kernels
    can be reported on the same layers (``python -m deprune_plugin.kernels.report --layers PATH``)."""
    torch.save([{"name": la.name, "geometry": asdict(la.geometry), "keep": la.keep.cpu(), "pw_out": la.pw_out,
                 "act": la.act, "residual": la.residual, "pw_note": la.pw_note} for la in layers], path)


def load_layers(path: str | os.PathLike) -> list[DWLayer]:
    """Read a file written by :func:`save_layers`."""
    items = torch.load(path, weights_only=True)
    out = []
    for it in items:
        geo = dict(it["geometry"])
        geo["pad"] = tuple(geo["pad"])
        extra = {k: it[k] for k in ("pw_out", "act", "residual", "pw_note") if k in it}
        out.append(DWLayer(it["name"], ConvGeometry(**geo), it["keep"].to(torch.bool), **extra))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deprune_plugin.kernels.report --layers PATH [--arch sm_90] [--dtype float16] [--json OUT]``."""
    p = argparse.ArgumentParser(description="Static kernel report over saved DW layers (see save_layers)")
    p.add_argument("--layers", required=True)
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    p.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rep = kernel_report(load_layers(args.layers), args.arch, args.dtype, progress=not args.quiet)
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
