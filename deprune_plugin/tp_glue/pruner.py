"""DEPruner: DEPrune inside torch-pruning's ``BasePruner`` (torch-pruning glue).

One ``step()`` does, at the step's scheduled ratios:

1. PW part: l2 filter pruning of the PW-conv2 groups (see :mod:`.structure`) through torch-pruning's
   dependency graph, so residual streams, next blocks' PW-conv1 inputs, BN, SE and classifier inputs shrink
   together; with variant "BH" each group's remaining width is tile-aligned up or down (HSR on PW).
2. DW part: DCP (variant "plain"), + BWT ("B"), + HSR ("BH") on every depth-wise conv, applied as tap
   masks that stay part of the model (:mod:`.masks`).

With ``step(interactive=True)`` groups are yielded as in torch-pruning; tap pruning happens when the
generator is exhausted, so BWT's ranges are balanced over the channels that remain.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from ..core.checks import check_bool, check_positive_int, check_ratio
from ..core.cost import Cost, count_cost
from ..core.latency import LatencyReport, LatencyTarget, get_target
from ..core.masks import attach_tap_mask, is_depthwise, slice_tap_mask, tap_mask
from ..core.method import (blind_channels, bwt_keep_mask, dcp_keep_mask, global_layer_ratios, hsr_apply, hsr_plan,
                           kept_per_range, tap_coverage)
from ..core.method.hsr import HSRDecision
from ..core.padding import conv_padding, same_padding
from ..core.probe import probe_structure
from ..core.summary import DEVIATION_POINTS, LayerRow, Summary, dw_deviation
from .adapters import run_fixups
from .importance import DEPruneImportance
from .latency_search import LatencyConfig, search
from .limits import GroupSearchTooLong, bounded_groups, failure_from, search_failure
from .serialization import attach_history, carried_history
from .structure import DEPruneStructure, DSConvBlock, analyse, find_depthwise

VARIANTS: dict[str, tuple[bool, bool]] = {"plain": (False, False), "B": (True, False), "BH": (True, True)}
"""variant name -> (BWT on, HSR on). "plain" = DEPrune, "B" = DEPrune-B, "BH" = DEPrune-BH."""


_BASE_ARGS = set(inspect.signature(tp.pruner.BasePruner.__init__).parameters) - {"self", "model", "example_inputs"}


def _check_ratio_dict(d: Mapping | None, name: str, model_modules: set[int]) -> dict:
    """The dict with every ratio checked and made a plain float (what torch-pruning gets)."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise TypeError(f"{name} must be a dict {{module: ratio}}, got {type(d).__name__}")
    out = {}
    for key, ratio in d.items():
        keys = key if isinstance(key, tuple) else (key,)
        for k in keys:
            if not isinstance(k, nn.Module):
                raise TypeError(f"{name} keys must be modules (or tuples of modules), got {type(k).__name__}")
            if id(k) not in model_modules:
                raise ValueError(f"{name} names a module that is not part of the model: {k.__class__.__name__}")
        out[key] = check_ratio(ratio, f"{name}[{keys[0].__class__.__name__}]")
    return out


def _resolve_ignored(model: nn.Module, ignored: Any, model_modules: set[int]) -> list:
    """``ignored_layers`` as modules / parameters; module names are resolved with ``get_submodule``."""
    if ignored is None:
        return []
    if isinstance(ignored, (str, nn.Module)) or not isinstance(ignored, Iterable):
        raise TypeError("ignored_layers must be a list of modules, module names or parameters, "
                        f"got {type(ignored).__name__}")
    out = []
    for item in ignored:
        if isinstance(item, str):
            try:
                item = model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"ignored_layers: the model has no submodule named {item!r}") from None
        if isinstance(item, nn.Parameter):
            out.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in model_modules:
                raise ValueError(f"ignored_layers holds a module that is not part of the model: "
                                 f"{item.__class__.__name__}")
            out.append(item)
        elif isinstance(item, type):
            raise TypeError(f"ignored_layers holds the class {item.__name__}: pass module instances or names "
                            "(torch-pruning silently drops classes)")
        else:
            raise TypeError(f"ignored_layers items must be modules, module names or parameters, got {item!r}")
    return out


def _as_inputs(example_inputs: Any) -> tuple:
    # A bare batch-1 tensor would be star-unpacked by torch-pruning's tracer: always pass a tuple.
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                    f"got {type(example_inputs).__name__}")


def _check_not_meta(model: nn.Module, inputs: tuple) -> None:
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"model has {len(meta)} tensor(s) on the 'meta' device (no values), e.g. {meta[0]!r}: "
                         "materialise and load weights first (model.to_empty(device='cpu'), load_state_dict)")
    if any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        raise ValueError("example_inputs are on the 'meta' device: pass real tensors")


def _caller_stacklevel() -> int:
    """``stacklevel`` of the caller's line for a warning raised here: the first frame outside this
    package, torch and torch-pruning (``step()`` reaches the taps through torch-pruning's loop, an
    interactive step through the caller's own loop)."""
    frame, level = sys._getframe(2), 2  # the frame that called warn's caller
    while frame is not None and any(f"{os.sep}{pkg}{os.sep}" in frame.f_code.co_filename
                                    for pkg in ("deprune_plugin", "torch", "torch_pruning")):
        frame, level = frame.f_back, level + 1
    return level


def _cap_floor(size: int, max_ratio: float) -> int:
    """Fewest of ``size`` columns / channels that may stay when at most ``max_ratio`` of them may go."""
    return max(0, math.ceil(size * (1 - max_ratio) - 1e-9))


class DEPruner(tp.pruner.BasePruner):
    """DEPrune / DEPrune-B / DEPrune-BH pruner for depth-wise-separable CNNs.

    Args:
        model: the model, pruned in place (a timm or torchvision DSConv CNN, or any model with DW convs).
        example_inputs: a tensor or tuple of tensors the model accepts, e.g. ``torch.randn(1, 3, 224, 224)``.
        importance: a group importance **instance** (callable over a torch-pruning group); its
            ``tap_scores(weight)`` method, when present, scores DW taps (default ``|w|``). Default
            :class:`DEPruneImportance`.
        dw_pruning_ratio: DCP target for every depth-wise conv, in ``[0, 1)``: the fraction of the layer's
            taps pruned **in total** (taps pruned earlier, e.g. by a previous DEPruner, count towards it).
        pw_pruning_ratio: fraction of PW-conv2 filters (stream channels) removed per group, in ``[0, 1)``, of
            the widths the model has **now** (as in torch-pruning: a second DEPruner compounds, 0.5 twice
            keeps 25%). ``0`` prunes DW taps only and never builds torch-pruning's dependency graph (works on
            models torch-pruning cannot trace; ``pruning_history()`` then adds nothing to the history the
            model carries).
        variant: ``"plain"`` (DEPrune), ``"B"`` (+BWT) or ``"BH"`` (+BWT+HSR).
        group_size: channels per balanced range (one DR sub-GEMM).
        tile_size: HSR alignment of kept columns (DW) and remaining filters (PW).
        iterative_steps: number of ``step()`` calls to reach the targets (torch-pruning's schedule).
        global_pruning: ``True``: per-layer DW targets from one model-wide magnitude threshold (scores
            normalised per layer, capped by ``max_pruning_ratio``: a warning says when the cap lowers the
            model-wide ratio) and global PW ranking.
        ignored_layers: modules (or their names, e.g. ``["blocks.3"]``) left alone, submodules included.
        dw_pruning_ratio_dict: ``{module: ratio}`` overrides; a module covers the DW convs inside it.
        pruning_ratio_dict: torch-pruning's per-layer PW ratios.
        prune_dw_channels: also prune expanded (hidden) channels as plain torch-pruning would; the paper
            does not (PW-conv1 and DW channels kept, section 4.2). Tap masks are sliced to match.
        hsr_alpha: ``"cost_model"`` (tile-step model, default), ``"measured"`` (time DR sub-GEMMs on the
            GPU; falls back to the cost model with a warning without one) or ``f(layer_name, kept, tile)``.
        latency_budget: prune for a device instead of fixed ratios: the pruned model's latency on
            ``target`` at the example input's shape, as a fraction of the unpruned model's, in ``(0, 1]``.
            The search chooses per block the expanded-channel ratio, the residual-stream ratio and (where
            ``target`` gains from it) DW taps at ``dw_pruning_ratio``, then measures the result;
            ``pw_pruning_ratio`` is not used. ``None`` (default): the paper's fixed ratios.
        target: where the model will run: ``"openvino"`` (default), ``"onnxruntime"``, ``"torch"`` (eager
            CPU), ``"cuda"`` (measured with a GPU, else modelled), or a
            :class:`~deprune_plugin.core.latency.LatencyTarget`.
        sensitivity_inputs: the batch the importance proxy runs on (default ``example_inputs``); real data
            (e.g. 64 training images, at the training resolution) ranks channels better than noise.
        latency_config: the search's levels and tolerance (:class:`.latency_search.LatencyConfig`).
        **tp_kwargs: other ``BasePruner`` arguments (``round_to``, ``max_pruning_ratio``,
            ``customized_pruners``, ``unwrapped_parameters``, ``forward_fn``, ...), same meaning.

    Raises:
        ValueError / TypeError naming the argument, before the model is touched.
        TorchPruningFailure (a ValueError): torch-pruning cannot build or search the model's graph (the
            message names the model part; ``pw_pruning_ratio=0`` still works). Raised in seconds: a group
            search is bounded in items, held channel indices (memory) and wall time (:mod:`.limits`), and
            only the PW-conv2 groups are ever enumerated.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        importance: Callable | None = None,
        dw_pruning_ratio: float = 0.78,
        pw_pruning_ratio: float = 0.5,
        variant: str = "BH",
        group_size: int = 32,
        tile_size: int = 32,
        iterative_steps: int = 1,
        global_pruning: bool = False,
        ignored_layers: Iterable[nn.Module | str] | None = None,
        dw_pruning_ratio_dict: Mapping[nn.Module, float] | None = None,
        pruning_ratio_dict: Mapping[nn.Module, float] | None = None,
        prune_dw_channels: bool = False,
        hsr_alpha: str | Callable[[str, int, int], float] = "cost_model",
        latency_budget: float | None = None,
        target: str | LatencyTarget = "openvino",
        sensitivity_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        latency_config: LatencyConfig | None = None,
        **tp_kwargs: Any,
    ) -> None:
        # ---- validate everything before the model is touched ----
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for bad in ("pruning_ratio", "ch_sparsity"):
            if bad in tp_kwargs:
                raise TypeError(f"{bad} is not a DEPruner argument: use pw_pruning_ratio (PW) / dw_pruning_ratio (DW)")
        unknown = sorted(set(tp_kwargs) - _BASE_ARGS)
        if unknown:
            raise TypeError(f"DEPruner got unexpected keyword argument(s) {unknown} "
                            "(neither DEPruner's nor BasePruner's)")
        dw_pruning_ratio = check_ratio(dw_pruning_ratio, "dw_pruning_ratio")
        pw_pruning_ratio = check_ratio(pw_pruning_ratio, "pw_pruning_ratio")
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        group_size = check_positive_int(group_size, "group_size")
        tile_size = check_positive_int(tile_size, "tile_size")
        iterative_steps = check_positive_int(iterative_steps, "iterative_steps")
        global_pruning = check_bool(global_pruning, "global_pruning")
        prune_dw_channels = check_bool(prune_dw_channels, "prune_dw_channels")
        max_ratio = tp_kwargs.get("max_pruning_ratio", 1.0)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real) or not 0.0 < float(max_ratio) <= 1.0:
            raise ValueError(f"max_pruning_ratio must be a number in (0, 1], got {max_ratio!r}")
        tp_kwargs["max_pruning_ratio"] = float(max_ratio)
        if tp_kwargs.get("round_to") is not None:
            tp_kwargs["round_to"] = check_positive_int(tp_kwargs["round_to"], "round_to")
        if importance is None:
            importance = DEPruneImportance()
        if isinstance(importance, type):
            raise TypeError(f"importance must be an instance, e.g. importance={importance.__name__}(), "
                            f"got the class {importance.__name__}")
        if not callable(importance):
            raise TypeError("importance must be callable over a torch-pruning group")
        if not (callable(hsr_alpha) or hsr_alpha in ("cost_model", "measured")):
            raise ValueError(f"hsr_alpha must be 'cost_model', 'measured' or a callable, got {hsr_alpha!r}")
        if latency_budget is not None:
            if isinstance(latency_budget, bool) or not isinstance(latency_budget, numbers.Real) or \
                    not 0.0 < float(latency_budget) <= 1.0:
                raise ValueError(f"latency_budget must be a fraction in (0, 1], got {latency_budget!r}")
            if global_pruning:
                raise ValueError("latency_budget chooses each block's ratios itself: global_pruning must be False")
            if latency_config is not None and not isinstance(latency_config, LatencyConfig):
                raise TypeError(f"latency_config must be a LatencyConfig, got {type(latency_config).__name__}")
            target = get_target(target)
        module_ids = {id(m) for m in model.modules()}
        dw_pruning_ratio_dict = _check_ratio_dict(dw_pruning_ratio_dict, "dw_pruning_ratio_dict", module_ids)
        pruning_ratio_dict = _check_ratio_dict(pruning_ratio_dict, "pruning_ratio_dict", module_ids)
        ignored_layers = _resolve_ignored(model, ignored_layers, module_ids)
        inputs = _as_inputs(example_inputs)
        _check_not_meta(model, inputs)
        sens_inputs = inputs if sensitivity_inputs is None else _as_inputs(sensitivity_inputs)
        ignored_set = {s for m in ignored_layers if isinstance(m, nn.Module) for s in m.modules()}
        if not find_depthwise(model, ignored_set):
            raise ValueError("model has no depth-wise conv (groups == in_channels == out_channels, kernel > 1) "
                             "outside ignored_layers: DEPrune has nothing to prune")
        was_training = model.training
        try:
            model.eval()  # a probe forward must not touch BN statistics
            with torch.no_grad():
                self._probe_record = probe_structure(model, inputs)
        except Exception as e:  # noqa: BLE001 - reported as the argument's fault, with the cause
            raise ValueError(f"example_inputs do not fit the model: {type(e).__name__}: {e}") from e
        finally:
            model.train(was_training)
        already = [n for n, m in find_depthwise(model, ignored_set) if tap_mask(m) is not None]
        if already:
            warnings.warn(f"{len(already)} DW conv(s) already carry tap masks (e.g. {already[0]!r}): "
                          "dw_pruning_ratio counts their pruned taps (a layer's total, not more on top), while "
                          "pw_pruning_ratio removes that fraction of the current widths (it compounds)",
                          stacklevel=2)

        # ---- build torch-pruning's machinery (only when channels are to be removed) ----
        self.dw_pruning_ratio = dw_pruning_ratio
        self.variant = variant
        self.use_bwt, self.use_hsr = VARIANTS[variant]
        self.group_size = group_size
        self.tile_size = tile_size
        self.prune_dw_channels = prune_dw_channels
        self.hsr_alpha = hsr_alpha
        self.example_inputs = inputs
        # Channel pruning the model went through before this pruner (load() or an earlier DEPruner):
        # its indices refer to earlier widths, so pruning_history() replays it first.
        self._history_before = carried_history(model)
        self.latency_budget = None if latency_budget is None else float(latency_budget)
        self.target = target if latency_budget is not None else None
        self.latency_config = latency_config or LatencyConfig()
        self.latency_report: LatencyReport | None = None
        self._sens_inputs = sens_inputs
        self._user_ignored = ignored_set
        self._dense_s: float | None = None
        self._latency_taps: dict[nn.Module, float] = {}
        self.uses_graph = pw_pruning_ratio > 0 or any(r > 0 for r in pruning_ratio_dict.values()) or \
            latency_budget is not None
        if latency_budget is not None:
            pw_pruning_ratio = 0.0  # the search chooses the widths
        if self.uses_graph:
            self._init_with_graph(model, inputs, importance, global_pruning, pw_pruning_ratio, pruning_ratio_dict,
                                  iterative_steps, ignored_layers, tp_kwargs, was_training)
        else:
            self._init_without_graph(model, importance, global_pruning, pw_pruning_ratio, iterative_steps,
                                     ignored_layers, tp_kwargs)
        self.pw_pruning_ratio = pw_pruning_ratio

        self.dw_schedule = self.iterative_pruning_ratio_scheduler(self.dw_pruning_ratio, self.iterative_steps)
        self._dw_override: dict[nn.Module, list[float]] = {}
        for key, ratio in dw_pruning_ratio_dict.items():
            for k in key if isinstance(key, tuple) else (key,):
                for m in k.modules():
                    if is_depthwise(m):
                        self._dw_override[m] = self.iterative_pruning_ratio_scheduler(ratio, self.iterative_steps)
        self._dw_target: dict[nn.Module, float] = {m: 0.0 for _, m in self._dw}
        self._dw_asked: dict[nn.Module, float] = {}
        self._dw_note: dict[nn.Module, str] = {}
        self._dw_hsr: dict[nn.Module, HSRDecision] = {}
        self._pw_hsr: list[HSRDecision] = []
        self._pw_before = {b.dw: sum(self._out_channels(p) for p in b.pw2) for b in self.structure.blocks}
        self.cost_before: Cost = count_cost(model, inputs)
        self.last_step_seconds: float | None = None

    def _init_with_graph(self, model, inputs, importance, global_pruning, pw_pruning_ratio, pruning_ratio_dict,
                         iterative_steps, ignored_layers, tp_kwargs, was_training) -> None:
        for d in ("in_channel_groups", "out_channel_groups", "num_heads", "channel_groups"):
            tp_kwargs.setdefault(d, {})  # BasePruner mutates shared default dicts: pass fresh ones
        # BasePruner.__init__ enumerates every group of the model (to count channels for head pruning);
        # on some models one of them takes minutes. DEPruner prunes only PW-conv2 groups: let the base
        # enumerate nothing and restore the root types afterwards (_prune then sees the targets only).
        root_types = tp_kwargs.pop("root_module_types", [ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_LSTM])
        try:
            super().__init__(model, inputs, importance=importance, global_pruning=global_pruning,
                             pruning_ratio=pw_pruning_ratio, pruning_ratio_dict=pruning_ratio_dict or None,
                             iterative_steps=iterative_steps, ignored_layers=ignored_layers,
                             root_module_types=[], **tp_kwargs)
        except Exception as e:  # noqa: BLE001 - torch-pruning's failure, reported with the model part
            raise failure_from(e, model, "building the dependency graph") from e
        finally:
            model.train(was_training)  # tracing leaves the model in eval mode
        self.root_module_types = root_types
        user_ignored = set(self.ignored_layers)
        self._dw = find_depthwise(model, user_ignored)
        try:
            with bounded_groups():
                self.structure = analyse(self.DG, model, self._dw, self._probe_record)
        except GroupSearchTooLong as e:
            raise search_failure(e, model) from None
        except Exception as e:  # noqa: BLE001
            raise failure_from(e, model, "searching the PW-conv2 groups") from e
        allowed = set(self.structure.pw_target_layers)
        if self.prune_dw_channels:
            allowed |= self.structure.hidden_layers
        self.ignored_layers.extend(m for m in self.DG.module2node
                                   if isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTM)) and m not in allowed
                                   and m not in user_ignored)
        # What BasePruner counted over all groups, over the groups DEPruner prunes.
        self.initial_total_channels = sum(self.DG.get_out_channels(r) or 0 for r in self.structure.pw_group_roots)

    def _init_without_graph(self, model, importance, global_pruning, pw_pruning_ratio, iterative_steps,
                            ignored_layers, tp_kwargs) -> None:
        """DW taps only: the BasePruner state DEPruner and BasePruner's public methods read, and no graph."""
        self.model = model
        self.importance = importance
        self.global_pruning = global_pruning
        self.pruning_ratio = pw_pruning_ratio
        self.pruning_ratio_dict = {}
        self.max_pruning_ratio = tp_kwargs["max_pruning_ratio"]
        self.round_to = tp_kwargs.get("round_to")
        self.isomorphic = tp_kwargs.get("isomorphic", False)
        self.iterative_steps = iterative_steps
        self.iterative_pruning_ratio_scheduler = tp_kwargs.get("iterative_pruning_ratio_scheduler", linear_scheduler)
        self.per_step_pruning_ratio = self.iterative_pruning_ratio_scheduler(pw_pruning_ratio, iterative_steps)
        self.current_step = 0
        self.ignored_layers = [s for m in ignored_layers if isinstance(m, nn.Module) for s in m.modules()]
        self.ignored_params = [p for p in ignored_layers if isinstance(p, nn.Parameter)]
        self.DG = None
        self._dw = find_depthwise(model, set(self.ignored_layers))
        self.structure = DEPruneStructure([DSConvBlock(n, m) for n, m in self._dw], set(), [], set())

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _out_channels(m: nn.Module) -> int:
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    def _coverage(self, conv: nn.Module) -> torch.Tensor | None:
        """``[kh, kw]`` fraction of output positions at which each tap reads real input, at the example
        input's resolution; None where the probe did not see the conv or its padding is not plain zeros."""
        hw = self._probe_record.example_in_hw.get(conv)
        pad = conv_padding(conv) if isinstance(conv, nn.Conv2d) else None
        if hw is None or pad is None:
            return None
        if pad == "same":
            pad = same_padding(hw[0], conv.kernel_size[0], conv.stride[0], conv.dilation[0]) + \
                same_padding(hw[1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        return tap_coverage(hw, tuple(conv.kernel_size), tuple(conv.stride), pad, tuple(conv.dilation))

    def _tap_scores(self, conv: nn.Module) -> torch.Tensor:
        fn = getattr(self.importance, "tap_scores", None)
        if fn is None:
            return conv.weight.detach().abs()
        try:  # importances written for the one-argument form (weight only) keep working
            takes_coverage = "coverage" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_coverage = False
        return fn(conv.weight, coverage=self._coverage(conv)) if takes_coverage else fn(conv.weight)

    def _alpha_fn(self, names: list[str], sizes: list[tuple[int, int]], channels: list[int]):
        if callable(self.hsr_alpha):
            return lambda i, k, t: self.hsr_alpha(names[i], k, t)
        if self.hsr_alpha == "measured":
            if torch.cuda.is_available():
                from ..core.method.hsr_timing import measured_alpha
                return lambda i, k, t: measured_alpha(k, t, self.group_size, channels[i], sizes[i])
            warnings.warn("hsr_alpha='measured' needs a CUDA GPU; using the tile cost model", stacklevel=3)
        return None

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False):
        """One pruning step (see torch-pruning). Returns the group generator when ``interactive``.

        With ``interactive=True`` the step counter advances at once (as in torch-pruning) and DW taps are
        pruned when the generator is exhausted: leaving the loop early (``break``) prunes no DW taps in this
        step, and a warning says so.
        """
        check_bool(interactive, "interactive")
        if interactive:
            return super().step(interactive=True)
        t0 = time.perf_counter()
        super().step(interactive=False)
        self.last_step_seconds = time.perf_counter() - t0
        return None

    def _prune(self):
        if self.current_step > self.iterative_steps:
            warnings.warn("Pruning exceed the maximum iterative steps, no pruning will be performed.", stacklevel=2)
            return
        # Collect the PW plan first: HSR on PW ranks all groups before any is pruned. Groups are disjoint
        # channel sets, so each is rebuilt lazily against the current shapes when its turn comes.
        if self.latency_budget is not None:
            plan = self._latency_plan()
        else:
            plan = [] if self.DG is None else \
                [(g[0].dep.target.module, g[0].dep.handler, list(g[0].idxs)) for g in super()._prune()]
            if self.use_hsr and plan:
                plan = self._hsr_pw(plan)
        for module, handler, idxs in plan:
            group = self.DG.get_pruning_group(module, handler, idxs)
            if not self.DG.check_pruning_group(group):
                continue
            try:
                yield group
            except GeneratorExit:
                warnings.warn(f"step(interactive=True) was left before its end: no DW taps were pruned in step "
                              f"{self.current_step} (current_step advanced anyway); iterate the generator to "
                              "the end to prune them", stacklevel=2)
                self._carry_history()  # the caller may have pruned the group it was given
                raise
            for dep, removed in group:  # the caller pruned the group (or not): keep masks in step
                if tap_mask(dep.target.module) is not None:
                    slice_tap_mask(dep.target.module, removed)
            run_fixups(self.model)
        self._carry_history()
        self._prune_taps()

    def _latency_plan(self) -> list:
        """This step's groups from the latency search, at the step's share of the budget; DW tap ratios
        go to ``_latency_taps``."""
        step_budget = 1 - (1 - self.latency_budget) * self.current_step / self.iterative_steps
        was_training = self.model.training
        try:
            result = search(self.model, self.DG, self.structure, self.example_inputs, self._sens_inputs,
                            self.target, step_budget, self.importance, self._user_ignored, self.max_pruning_ratio,
                            self.dw_pruning_ratio, self.group_size, self.latency_config, dense_s=self._dense_s)
        finally:
            self.model.train(was_training)
        self._dense_s = result.report.dense_s
        result.report.budget = step_budget
        self.latency_report = result.report
        self._latency_taps = {self.model.get_submodule(n): r for n, r in result.taps.items()}
        plan = []
        for name, idxs in result.plan:
            module = self.model.get_submodule(name)
            plan.append((module, self.DG.get_pruner_of_module(module).prune_out_channels, idxs))
        return plan

    def _hsr_pw(self, plan: list) -> list:
        kept, limits, floors = [], [], []
        for module, handler, idxs in plan:
            out = self.DG.is_out_channel_pruning_fn(handler)
            c = self.DG.get_out_channels(module) if out else self.DG.get_in_channels(module)
            limits.append(c)
            kept.append(c - len(idxs) if c > self.tile_size else None)  # narrow streams stay as they are
            init = (self.layer_init_out_ch if out else self.layer_init_in_ch).get(module, c)
            floors.append(_cap_floor(init, self.max_pruning_ratio))  # rounding down never passes the cap
        decisions = hsr_plan(kept, self.tile_size, limits, floors=floors)
        self._pw_hsr = [d for d in decisions if d.kept is not None]
        out = []
        for (module, handler, idxs), d, c in zip(plan, decisions, limits):
            if d.mark != "-" and d.new_kept != d.kept:
                full = self.DG.get_pruning_group(module, handler, list(range(c)))
                imp = self.estimate_importance(full)
                if imp is not None and len(imp) == c:
                    idxs = torch.argsort(imp.cpu(), stable=True)[: c - d.new_kept].tolist()
            out.append((module, handler, idxs))
        return out

    def _dw_ratio(self, conv: nn.Module) -> float:
        if self.latency_budget is not None:
            return self._latency_taps.get(conv, 0.0)
        return self._dw_override.get(conv, self.dw_schedule)[self.current_step]

    @torch.no_grad()
    def _prune_taps(self) -> None:
        convs = [(n, m) for n, m in self._dw if m.weight.shape[0] > 0]
        scores = {m: self._tap_scores(m) for _, m in convs}
        asked = {m: self._dw_ratio(m) for _, m in convs}
        cap = self.max_pruning_ratio
        targets = {m: min(r, cap) for m, r in asked.items()}  # a cap, as torch-pruning caps its ratios
        if self.global_pruning:
            free = [m for _, m in convs if m not in self._dw_override]
            ratios = global_layer_ratios([scores[m] for m in free], self.dw_schedule[self.current_step], cap)
            targets.update(zip(free, ratios))
        prev = {m: (tap_mask(m) if tap_mask(m) is not None else torch.ones_like(m.weight, dtype=torch.bool))
                for _, m in convs}
        keep = {}
        for _, m in convs:
            if self.use_bwt:
                keep[m] = bwt_keep_mask(scores[m], targets[m], self.group_size, prev[m])
            else:
                keep[m] = dcp_keep_mask(scores[m], targets[m], prev[m])
        if self.use_hsr:
            kept = [kept_per_range(keep[m], self.group_size)[0] if m.weight.shape[0] >= self.group_size else None
                    for _, m in convs]
            limits = [self.group_size * m.weight[0].numel() for _, m in convs]
            alpha = self._alpha_fn([n for n, _ in convs], [self._probe_record.out_hw.get(m, (1, 1)) for _, m in convs],
                                   [m.weight.shape[0] for _, m in convs])
            floors = [_cap_floor(n, cap) for n in limits]
            weights = [m.weight.shape[0] // self.group_size for _, m in convs]
            for (_, m), d in zip(convs, hsr_plan(kept, self.tile_size, limits, alpha, floors, weights)):
                self._dw_hsr[m] = d
                if d.mark != "-":
                    keep[m] = hsr_apply(scores[m], keep[m], prev[m], d.new_kept, self.group_size)
        for _, m in convs:
            attach_tap_mask(m, keep[m])
            self._dw_target[m] = targets[m]
            self._dw_asked[m] = asked[m]
            self._dw_note[m] = self._deviation_note(m, asked[m], targets[m], keep[m], prev[m])
        dev = dw_deviation(self._rows())
        if dev is not None:
            warnings.warn(f"the model-wide DW ratio is {dev[1]:.2%}, not the requested {dev[0]:.2%} (step "
                          f"{self.current_step} of {self.iterative_steps}): {dev[2]}; summary() notes each layer",
                          stacklevel=_caller_stacklevel())

    def _deviation_note(self, m: nn.Module, asked: float, target: float, keep: torch.Tensor,
                        prev: torch.Tensor) -> str:
        """Why layer ``m`` ended below what was asked (the cap) or more than DEVIATION_POINTS off its target,
        as ``"kind: detail"`` parts joined by ``"; "`` ("" when neither)."""
        real = 1 - int(keep.sum()) / keep.numel()
        parts = []
        if asked - real > DEVIATION_POINTS and asked > target and target >= self.max_pruning_ratio - 1e-12:
            parts.append(f"cap: max_pruning_ratio={self.max_pruning_ratio:g} (asked {asked:.2%})")
        if abs(real - target) > DEVIATION_POINTS:
            d = self._dw_hsr.get(m)
            channels = m.weight.shape[0]
            smallest = min(min(self.group_size, channels - s) for s in range(0, channels, self.group_size)) * \
                m.weight[0].numel()
            if d is not None and d.mark != "-" and d.new_kept != d.kept:
                parts.append(f"HSR {d.mark}: K' {d.kept} -> {d.new_kept} per range (tile {self.tile_size})")
            elif 1 - int(prev.sum()) / prev.numel() > target + DEVIATION_POINTS:
                parts.append("taps pruned earlier: the mask only grows")
            elif 1 / smallest > DEVIATION_POINTS:
                parts.append(f"too few taps: a range of {smallest} taps rounds in steps of {1 / smallest:.1%}")
            else:
                parts.append("rounding: floor per range")
        return "; ".join(parts)

    def pruning_history(self) -> list:
        """Channel-pruning history from the unpruned architecture: the history the model carried when this
        pruner was built (``model.deprune_history``, set by ``load()`` or an earlier DEPruner), then
        torch-pruning's history of this pruner (none when no dependency graph was needed). Entries are
        ``[module_name, is_out_channel, idxs]``, indices relative to the widths at that step."""
        own = [] if self.DG is None else super().pruning_history()
        return self._history_before + list(own)

    def _carry_history(self) -> None:
        """Let the model carry the full history, so a later DEPruner (or ``save``) continues from it."""
        attach_history(self.model, self.pruning_history())

    def load_pruning_history(self, pruning_history) -> None:
        if self.DG is None:
            if pruning_history:
                raise ValueError("this DEPruner prunes DW taps only (pw_pruning_ratio=0): it has no dependency "
                                 "graph to replay a channel-pruning history on")
            return
        super().load_pruning_history(pruning_history)
        self._carry_history()

    # ------------------------------------------------------------------ report
    def summary(self) -> Summary:
        """Per-DSConv-layer report and model totals (see :class:`Summary`)."""
        return Summary(rows=self._rows(), before=self.cost_before, after=count_cost(self.model, self.example_inputs),
                       pw_hsr=[d.mark for d in self._pw_hsr], variant=self.variant, latency=self.latency_report)

    def _rows(self) -> list[LayerRow]:
        rows = []
        for b in self.structure.blocks:
            m = b.dw
            mask = tap_mask(m)
            keep = mask if mask is not None else torch.ones_like(m.weight, dtype=torch.bool)
            kept = kept_per_range(keep, self.group_size)
            taps = m.weight[0].numel()
            channels = m.weight.shape[0]
            bounds = [min(self.group_size, channels - s) * taps for s in range(0, channels, self.group_size)]
            real = min(1 - k / n for k, n in zip(kept, bounds)) if kept else 0.0
            d = self._dw_hsr.get(m)
            coverage = self._coverage(m)
            blind = 0 if coverage is None else int(blind_channels(keep, coverage).numel())
            rows.append(LayerRow(
                name=b.dw_name, kernel=tuple(m.kernel_size), channels=m.weight.shape[0],
                target_ratio=self._dw_target.get(m, 0.0), real_ratio=real, kept_per_range=kept,
                hsr=d.mark if d is not None else "-",
                pw_before=self._pw_before.get(m, 0), pw_after=sum(self._out_channels(p) for p in b.pw2),
                pw_names=list(b.pw2_names), asked_ratio=self._dw_asked.get(m), note=self._dw_note.get(m, ""),
                blind_channels=blind))
        return rows
