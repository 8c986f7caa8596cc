"""DW + PW fused pairs: a depth-wise conv and the 1x1 conv that alone reads its output, as one module.

A DW conv is memory bound and tap pruning does not cut its traffic; never writing the (expanded) DW output
to memory does. :class:`FusedDSConv` holds a :class:`FastDWConv` (BN folded, activation fused) and the PW
conv after it (its BN folded too) and chooses per input signature, by the same checked measurement as every
kernel, between

- ``"unfused"``: the DW layer (its own kernel choice) then the 1x1 conv (cuDNN on CUDA), and
- ``"fused"``: one kernel (``deprune_plugin.kernels.dw_pw_fused``) that keeps the DW result on chip and
  multiplies it by the PW weights there.

Pairs are found in a traced forward of the already accelerated model: the PW conv must be the next module
called, its input must *be* the DW module's output, and nothing else may read that output (an SE block,
which pools the DW output before the PW conv, or a skip from the DW output prevents fusion; the report
says which: SE blocks are left unfused, cleanly).

Residual adds: a block (any module, e.g. timm's ``InvertedResidual`` or ``DepthwiseSeparableConv``) whose
calls are a chain of modules from its input to a pair, then only pass-through modules (``Identity``, an eval
``DropPath``), and whose output is exactly that pair's output plus the block's input, becomes a
:class:`ResidualPair`: ``pair(chain(x), residual=x)``, the add done in the fused kernel's epilogue
(:func:`plan_residual_edits`). Like every edit, it stays only if the model's outputs still match.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.dispatch import KernelDispatcher, dispatch_key
from ..kernels.planned import plan_call, plan_key
from .convert import Edit, ReportEntry
from .fold import Trace, trace_calls
from .modules import DISPATCHER_LOCK, FastDWConv, decode_choices, encode_choices

_CHOICES_KEY = "pair_choices"
_CHOICE_NAMES = ("unfused", "fused")

__all__ = ["FusedDSConv", "ResidualPair", "fused_kernel_available", "plan_pair_edits", "plan_residual_edits"]


def fused_kernel_available() -> bool:
    """Whether the kernels package provides the fused DW+PW kernel."""
    import deprune_plugin.kernels as kernels

    return hasattr(kernels, "dw_pw_fused")


def _unfused(x: torch.Tensor, mod: "FusedDSConv", residual: torch.Tensor | None = None) -> torch.Tensor:
    return mod.unfused(x, residual)


def _fused(x: torch.Tensor, mod: "FusedDSConv", residual: torch.Tensor | None = None) -> torch.Tensor:
    return mod.run_fused(x, residual)


class FusedDSConv(nn.Module):
    """``pw(dw(x))`` with ``dw`` a :class:`FastDWConv` and ``pw`` a 1x1 conv with folded BN.

    Args:
        dw: the depth-wise layer (BN folded, activation fused).
        pw_weight: ``[C_out, C, 1, 1]`` folded weight of the PW conv.
        pw_bias: ``[C_out]`` folded bias (zeros if the conv had none).
        label: the pair's name in reports.

    Shapes: ``[N, C, H, W]`` -> ``[N, C_out, Ho, Wo]``; ``forward(x, residual)`` adds ``residual``
    ``[N, C_out, Ho, Wo]`` (the fused kernel in its epilogue).
    """

    def __init__(self, dw: FastDWConv, pw_weight: torch.Tensor, pw_bias: torch.Tensor, label: str = "") -> None:
        super().__init__()
        if pw_weight.dim() != 4 or pw_weight.shape[1] != dw.groups or tuple(pw_weight.shape[2:]) != (1, 1):
            raise ValueError(f"pw_weight must be [C_out, {dw.groups}, 1, 1], got {tuple(pw_weight.shape)}")
        self.dw = dw
        self.register_buffer("pw_weight", pw_weight.detach().clone())
        self.register_buffer("pw_bias", pw_bias.detach().clone())
        self.label = label
        self.choices: dict[tuple, str] = {}
        self._dispatcher: KernelDispatcher | None = None
        self._pw_cast: dict[tuple, tuple] = {}  # see _pw_operands
        self._calls: dict[tuple, Any] = {}  # (plan key of x, of the residual) -> the fused launch, planned

    def extra_repr(self) -> str:
        return f"pw {self.pw_weight.shape[1]} -> {self.pw_weight.shape[0]}"

    def unfused(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The DW layer, then the 1x1 conv (then the residual add)."""
        y = self.dw(x)
        out = F.conv2d(y, self.pw_weight.to(y.dtype), self.pw_bias.to(y.dtype))
        return out if residual is None else out + residual

    def _pw_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1x1 weight as ``[C_out, C]`` in ``x.dtype`` and its bias in fp32, made once per dtype and device
        (a ``.to()`` or a load makes new buffers: a new key, the old copies dropped)."""
        w, b = self.pw_weight, self.pw_bias
        key = (x.dtype, x.device, w.data_ptr(), w._version, b.data_ptr(), b._version)  # an in-place write: rebuilt
        ops = self._pw_cast.get(key)
        if ops is None:
            ops = (self.pw_weight.reshape(self.pw_weight.shape[0], -1).to(x.dtype).contiguous(),
                   self.pw_bias.to(torch.float32).contiguous())
            self._pw_cast = {key: ops}
        return ops

    def run_fused(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The fused kernel (DW taps + bias + act, then the PW GEMM + bias (+ residual), in one pass)."""
        import deprune_plugin.kernels as kernels

        dw = self.dw
        fmt = dw.formats()
        backend = "emu" if dw.backend == "emu" else "cupy"
        kw = {} if residual is None else {"residual": residual}  # stand-ins in tests take no residual
        pw_weight, pw_bias = self._pw_operands(x)
        return kernels.dw_pw_fused(x, fmt["taps"], fmt["bias"], pw_weight, pw_bias,
                                   stride=dw.stride, padding=dw.pads(x), dilation=dw.dilation, act=dw.act,
                                   backend=backend, **kw)

    def dispatcher(self) -> KernelDispatcher:
        with DISPATCHER_LOCK:
            if self._dispatcher is None:
                d = KernelDispatcher({"unfused": _unfused, "fused": _fused}, label=self.label)
                for key, name in self.choices.items():
                    d.restore(key, name)
                self._dispatcher = d
        return self._dispatcher

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not self.dw._uses_kernels(x):
            return self.unfused(x, residual)
        key = dispatch_key(x)
        name = self.choices.get(key)
        if name is None:
            name = self.choices[key] = self.dispatcher().select(x, self, residual).name
        if name == "unfused":
            return self.unfused(x, residual)
        # The fused launch is planned once per signature (x's and the residual's): later calls allocate the
        # output, write the pointers and launch (deprune_plugin.kernels.planned), no argument checks or planning.
        call_key = (plan_key(x), None if residual is None else plan_key(residual))
        call = self._calls.get(call_key)
        extra = () if residual is None else (residual,)
        if call is not None:
            return call(x, *extra)
        plan, y, _ = plan_call(lambda t: self.run_fused(t, residual), x, self._kernel_tensors(x), extra)
        self._calls[call_key] = plan if plan is not None else (lambda t, *r: self.run_fused(t, *r))
        return y

    def _kernel_tensors(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        from ..kernels.dw_pw_fused import fused_tap_tables

        fmt = self.dw.formats()
        return [*fused_tap_tables(fmt["taps"], 16 // x.element_size()), fmt["bias"], *self._pw_operands(x)]

    def _apply(self, fn, recurse=True):
        self._calls, self._pw_cast = {}, {}  # new buffers (a move, a cast): new pointers to plan for
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dispatcher"] = None
        state["_pw_cast"] = {}
        state["_calls"] = {}
        return state

    # The per-signature choice travels in the state dict (one int64 tensor), like FastDWConv's kernel choices:
    # a model rebuilt by accelerate() and loaded does not re-time known signatures.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _CHOICES_KEY] = encode_choices(self.choices, _CHOICE_NAMES)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        rows = state_dict.pop(prefix + _CHOICES_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._calls, self._pw_cast = {}, {}  # the buffers were overwritten in place: same pointers, new values
        if rows is not None:
            state_dict[prefix + _CHOICES_KEY] = rows  # leave the caller's dict as it was
            self.choices = decode_choices(rows, _CHOICE_NAMES)
            self._dispatcher = None


def _pairable_pw(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.padding_mode == "zeros")


def plan_pair_edits(model: nn.Module, example_inputs: tuple) -> tuple[list[Edit], list[ReportEntry]]:
    """Edits fusing each :class:`FastDWConv` with the 1x1 conv that alone reads its output, and report
    entries for the DW layers left unfused (with the reason)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    trace: Trace = trace_calls(model, tuple(example_inputs))
    names = {m: n for n, m in model.named_modules()}
    edits, left = [], []
    for i, call in enumerate(trace.calls):
        if not isinstance(call.module, FastDWConv):
            continue
        dw, name = call.module, names[call.module]
        j = i + 1  # skip the Identity modules left where BN / activation used to be
        while j < len(trace.calls) and type(trace.calls[j].module) is nn.Identity and trace.calls[j].inp is call.out:
            j += 1
        nxt = trace.calls[j] if j < len(trace.calls) else None
        if nxt is None or not _pairable_pw(nxt.module):
            what = "nothing" if nxt is None else type(nxt.module).__name__
            left.append(ReportEntry(name, "unfused", f"next op is {what}, not a plain 1x1 conv (e.g. an SE block)"))
            continue
        if nxt.inp is not call.out:
            left.append(ReportEntry(name, "unfused", f"the next 1x1 conv ({names[nxt.module]}) does not read the DW "
                                                     "output directly (an SE block or another op in between)"))
            continue
        if trace.readers(call) != 1 or trace.count.get(nxt.module) != 1:
            left.append(ReportEntry(name, "unfused", "the DW output is read by more than the 1x1 conv after it"))
            continue
        pw = nxt.module
        bias = pw.bias.detach() if pw.bias is not None else torch.zeros(pw.out_channels, device=pw.weight.device,
                                                                          dtype=pw.weight.dtype)
        pair = FusedDSConv(dw, pw.weight.detach(), bias, label=f"{name}+{names[pw]}")
        entry = ReportEntry(name, "fused", f"paired with {names[pw]} ({pw.in_channels} -> {pw.out_channels})")
        edits.append(Edit(name, entry, [(name, pair), (names[pw], nn.Identity())]))
    return edits, left


class ResidualPair(nn.Module):
    """A block computing ``pair(chain(x)) + x``, run as ``pair(chain(x), residual=x)``.

    Args:
        chain: the modules the block runs before the pair, in order (e.g. the expansion 1x1 conv, BN folded).
        pair: the block's :class:`FusedDSConv`.

    Shapes: ``[N, C_in, H, W]`` -> ``[N, C_in, H, W]`` (a residual block keeps its shape).
    """

    def __init__(self, chain: list[nn.Module], pair: FusedDSConv) -> None:
        super().__init__()
        self.chain = nn.Sequential(*chain)
        self.pair = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(self.chain(x), residual=x)


def _block_trace(model: nn.Module, inputs: tuple, blocks: list[nn.Module]):
    """Leaf-level calls ``[(module, input, output)]`` of one forward (a :class:`FusedDSConv` counts as a leaf)
    and, per block, ``(first call index, end index, input, output)``."""
    inside = {id(m) for p in model.modules() if isinstance(p, FusedDSConv) for m in p.modules() if m is not p}
    leaves = [m for m in model.modules()
              if id(m) not in inside and (isinstance(m, FusedDSConv) or not list(m.children()))]
    calls: list[tuple[nn.Module, Any, Any]] = []
    spans: dict[int, list] = {}

    def leaf_hook(mod, args, out):
        calls.append((mod, args[0] if args else None, out))

    def pre(mod, args):
        spans.setdefault(id(mod), [len(calls), None, args[0] if args else None, None])

    def post(mod, args, out):
        span = spans[id(mod)]
        if span[1] is None:
            span[1], span[3] = len(calls), out
    handles = [m.register_forward_hook(leaf_hook) for m in leaves]
    for b in blocks:
        handles += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, spans


def plan_residual_edits(model: nn.Module, example_inputs: tuple) -> list[Edit]:
    """Edits turning each block ``chain -> pair -> pass-through`` with ``output == pair output + input`` into a
    :class:`ResidualPair` (see the module doc). Blocks that do not have exactly that form are left alone."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    names = {m: n for n, m in model.named_modules()}
    pairs = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedDSConv)]
    parents = {}
    for name, pair in pairs:
        parent_name = name.rpartition(".")[0]
        if parent_name:
            parents[parent_name] = (model.get_submodule(parent_name), pair)
    if not parents:
        return []
    calls, spans = _block_trace(model, tuple(example_inputs), [b for b, _ in parents.values()])
    counts: dict[int, int] = {}
    for mod, _, _ in calls:
        counts[id(mod)] = counts.get(id(mod), 0) + 1
    edits = []
    for parent_name, (block, pair) in parents.items():
        span = spans.get(id(block))
        if span is None or span[1] is None or not isinstance(span[2], torch.Tensor):
            continue
        start, end, inp, out = span
        inner = calls[start:end]
        at = [i for i, c in enumerate(inner) if c[0] is pair]
        if len(at) != 1 or counts.get(id(pair)) != 1:
            continue
        k = at[0]
        chain, prev = [], inp
        for mod, a, o in inner[:k]:  # a linear chain from the block's input to the pair
            if a is not prev or counts.get(id(mod)) != 1:
                break
            chain.append(mod)
            prev = o
        else:
            if inner[k][1] is not prev:
                continue
            prev = inner[k][2]
            if all(a is prev and o is prev for _, a, o in inner[k + 1:]) and isinstance(out, torch.Tensor) \
                    and out.shape == inp.shape and torch.equal(out, prev + inp):
                entry = ReportEntry(parent_name, "fused", f"residual add fused into {names[pair]}'s epilogue")
                edits.append(Edit(parent_name, entry, [(parent_name, ResidualPair(chain, pair))]))
    return edits
