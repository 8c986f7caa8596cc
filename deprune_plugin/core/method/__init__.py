"""The DEPrune method as pure functions over tensors (no torch-pruning import).

- :mod:`.ranges`: balanced ranges (``group_size`` consecutive channels with all their taps).
- :mod:`.dcp`: Depth-wise Convolution Pruning: layer-wise magnitude pruning of DW taps.
- :mod:`.bwt`: Balanced Workload Tuning: the same ratio in every balanced range.
- :mod:`.hsr`: Hardware-aware Sparsity Recalibration: kept columns aligned to the GPU tile.
- :mod:`.global_ratio`: per-layer targets from one model-wide magnitude threshold.
- :mod:`.geometry`: which taps ever read real input at the model's resolution (geometry-aware importance).
"""
from .bwt import bwt_keep_mask
from .dcp import dcp_keep_mask
from .geometry import blind_channels, geometry_tap_scores, tap_coverage, with_channel_floor
from .global_ratio import global_layer_ratios
from .hsr import HSRDecision, hsr_apply, hsr_plan, tile_cost_alpha
from .ranges import kept_per_range, range_bounds, range_ratios, real_ratio

__all__ = [
    "dcp_keep_mask", "bwt_keep_mask", "tap_coverage", "geometry_tap_scores", "blind_channels",
    "with_channel_floor", "global_layer_ratios", "HSRDecision", "hsr_plan", "hsr_apply",
    "tile_cost_alpha", "kept_per_range", "range_bounds", "range_ratios", "real_ratio",
]
