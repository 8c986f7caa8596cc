"""Compact weight formats of a tap-pruned depth-wise conv, consumed by the CUDA kernels.

Pure torch (no CuPy): both formats are built once at conversion time from a dense DW weight
``[C, 1, kh, kw]`` and a keep mask, and moved to the kernel's device with :meth:`to`.

- :class:`CompactTaps`: per-channel CSR of the kept taps, for the direct kernel (``cuda/dw_direct.cu``).
- :class:`DRColumns`: per balanced range, the kept (channel, tap) columns of the DR sub-GEMM padded to a
  multiple of the K tile, for the DR kernel (``cuda/dw_dr.cu``).

A tap is indexed ``i * kw + j`` inside the ``kh x kw`` window. A kept tap whose weight is exactly 0 stays
kept (it is a column of the sub-GEMM); pass ``mask=None`` to treat every zero weight as pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompactTaps", "DRColumns"]


def _check_weight_and_mask(weight: torch.Tensor,
                           mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a DW weight ``[C, 1, kh, kw]`` and an optional mask; return ``(weight fp32, keep bool)``,
    both ``[C, kh, kw]`` on the weight's device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape [C, 1, kh, kw] (depth-wise), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], weight.shape[2], weight.shape[3])
    if mask is None:
        return w, w != 0
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) not in (tuple(weight.shape), tuple(w.shape)):
        raise ValueError(f"mask must have shape {tuple(weight.shape)} or {tuple(w.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be boolean or contain only 0/1")
    return w, mask.reshape(w.shape).to(torch.bool)


def _check_kernel_size(kernel_size: tuple[int, int]) -> tuple[int, int]:
    if len(kernel_size) != 2 or any(int(k) < 1 for k in kernel_size):
        raise ValueError(f"kernel_size must be two positive ints, got {kernel_size!r}")
    return int(kernel_size[0]), int(kernel_size[1])


def _length(field: str, less: int, doc: str) -> property:
    """Read-only property ``self.<field>.numel() - less`` (the counts both formats derive from their tensors)."""
    return property(lambda self: getattr(self, field).numel() - less, doc=doc)


def _check_index_tensor(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")


@dataclass
class CompactTaps:
    """Per-channel CSR of the kept taps of one DW conv.

    Channel ``c`` keeps the taps ``tap_idx[tap_ptr[c]:tap_ptr[c+1]]`` (ascending), weights ``tap_val[...]``.

    Attributes:
        tap_ptr: int32 ``[C + 1]``, ``tap_ptr[0] == 0``, non-decreasing, ``tap_ptr[C] == nnz``.
        tap_idx: int32 ``[nnz]``, tap index ``i * kw + j`` in ``[0, kh * kw)``.
        tap_val: float32 ``[nnz]``, the (BN-folded) weight of each kept tap.
        kernel_size: ``(kh, kw)``.
    """

    tap_ptr: torch.Tensor
    tap_idx: torch.Tensor
    tap_val: torch.Tensor
    kernel_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.kernel_size = _check_kernel_size(self.kernel_size)
        _check_index_tensor("tap_ptr", self.tap_ptr, torch.int32)
        _check_index_tensor("tap_idx", self.tap_idx, torch.int32)
        _check_index_tensor("tap_val", self.tap_val, torch.float32)
        if self.tap_ptr.numel() < 2:
            raise ValueError("tap_ptr must have C + 1 >= 2 entries")
        if self.tap_idx.numel() != self.tap_val.numel():
            raise ValueError(f"tap_idx ({self.tap_idx.numel()}) and tap_val ({self.tap_val.numel()}) "
                             "differ in length")
        if len({self.tap_ptr.device, self.tap_idx.device, self.tap_val.device}) != 1:
            raise ValueError("tap_ptr, tap_idx and tap_val must be on one device")
        # One-off content check (a device sync on CUDA; formats are built at conversion time, not per call).
        ptr = self.tap_ptr.cpu()
        if int(ptr[0]) != 0 or int(ptr[-1]) != self.tap_idx.numel() or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError("tap_ptr must start at 0, be non-decreasing and end at nnz")
        kh, kw = self.kernel_size
        if self.tap_idx.numel() and (int(self.tap_idx.min()) < 0 or int(self.tap_idx.max()) >= kh * kw):
            raise ValueError(f"tap_idx entries must lie in [0, {kh * kw})")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "CompactTaps":
        """Build from a DW weight ``[C, 1, kh, kw]``; kept taps = ``mask`` (``[C, 1, kh, kw]`` or
        ``[C, kh, kw]``, bool or 0/1) if given, else ``weight != 0``. Tensors stay on the weight's device."""
        w, keep = _check_weight_and_mask(weight, mask)
        c, kh, kw = w.shape
        keep2 = keep.reshape(c, kh * kw)
        counts = keep2.sum(dim=1)
        tap_ptr = torch.zeros(c + 1, dtype=torch.int64, device=w.device)
        tap_ptr[1:] = torch.cumsum(counts, dim=0)
        chan, tap = keep2.nonzero(as_tuple=True)  # row-major: channel-major, taps ascending
        return cls(
            tap_ptr=tap_ptr.to(torch.int32),
            tap_idx=tap.to(torch.int32),
            tap_val=w.reshape(c, kh * kw)[chan, tap].contiguous(),
            kernel_size=(kh, kw),
        )

    num_channels = _length("tap_ptr", 1, "C.")
    nnz = _length("tap_idx", 0, "Number of kept taps over all channels.")

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight ``[C, 1, kh, kw]`` float32 (pruned taps are 0)."""
        kh, kw = self.kernel_size
        c = self.num_channels
        dense = torch.zeros(c, kh * kw, dtype=torch.float32, device=self.tap_val.device)
        counts = (self.tap_ptr[1:] - self.tap_ptr[:-1]).to(torch.int64)
        chan = torch.repeat_interleave(torch.arange(c, device=dense.device), counts)
        dense[chan, self.tap_idx.to(torch.int64)] = self.tap_val
        return dense.reshape(c, 1, kh, kw)

    def to(self, device: torch.device | str) -> "CompactTaps":
        """A copy with every tensor on ``device``."""
        return CompactTaps(self.tap_ptr.to(device), self.tap_idx.to(device), self.tap_val.to(device),
                           self.kernel_size)


@dataclass
class DRColumns:
    """The compacted DR sub-GEMM columns of one DW conv, per balanced range.

    Range ``g`` holds channels ``[g * group_size, min((g + 1) * group_size, C))``; its columns are
    ``col_ptr[g] .. col_ptr[g+1]``: the range's K'_g kept (channel, tap) pairs in tap-major order (tap, then
    channel: in channels_last consecutive columns of one tap read neighbouring channels of one pixel),
    followed by zero padding columns up to a multiple of ``tile`` (channel = first channel of the range,
    tap 0, value 0).

    Attributes:
        col_ptr: int32 ``[G + 1]``, padded offsets; each ``col_ptr[g+1] - col_ptr[g]`` is a multiple of
            ``tile``.
        col_chan: int32 ``[ncols]``, channel of each column (an index into the layer's C channels).
        col_tap: int32 ``[ncols]``, tap ``i * kw + j`` of each column.
        col_val: float32 ``[ncols]``, weight of each column (0 for padding).
        col_kept: int32 ``[G]``, K'_g: kept columns of each range before padding.
        kernel_size: ``(kh, kw)``.
        group_size: channels per balanced range.
        tile: K tile the column counts are padded to.
        num_channels: C, the layer's channel count (``G == ceil(C / group_size)``).
    """

    col_ptr: torch.Tensor
    col_chan: torch.Tensor
    col_tap: torch.Tensor
    col_val: torch.Tensor
    col_kept: torch.Tensor
    kernel_size: tuple[int, int]
    group_size: int
    tile: int
    num_channels: int

    def __post_init__(self) -> None:
        self.kernel_size = _check_kernel_size(self.kernel_size)
        if int(self.group_size) < 1 or int(self.tile) < 1 or int(self.num_channels) < 1:
            raise ValueError(f"group_size, tile and num_channels must be >= 1, got "
                             f"{self.group_size}, {self.tile} and {self.num_channels}")
        self.group_size, self.tile = int(self.group_size), int(self.tile)
        self.num_channels = int(self.num_channels)
        for name, dtype in (("col_ptr", torch.int32), ("col_chan", torch.int32), ("col_tap", torch.int32),
                            ("col_val", torch.float32), ("col_kept", torch.int32)):
            _check_index_tensor(name, getattr(self, name), dtype)
        n = self.col_chan.numel()
        if self.col_tap.numel() != n or self.col_val.numel() != n:
            raise ValueError("col_chan, col_tap and col_val must have the same length")
        num_ranges = -(-self.num_channels // self.group_size)
        if self.col_ptr.numel() != num_ranges + 1 or self.col_kept.numel() != num_ranges:
            raise ValueError(f"col_ptr must have G + 1 = {num_ranges + 1} entries and col_kept "
                             f"G = {num_ranges} (C={self.num_channels}, group_size={self.group_size}), got "
                             f"{self.col_ptr.numel()} and {self.col_kept.numel()}")
        tensors = (self.col_ptr, self.col_chan, self.col_tap, self.col_val, self.col_kept)
        if len({t.device for t in tensors}) != 1:
            raise ValueError("all DRColumns tensors must be on one device")
        ptr = self.col_ptr.cpu().to(torch.int64)
        widths = ptr[1:] - ptr[:-1]
        bad_width = bool((widths < 0).any()) or bool((widths % self.tile).any())
        if int(ptr[0]) != 0 or int(ptr[-1]) != n or bad_width:
            raise ValueError(f"col_ptr must start at 0, end at ncols and step by multiples of "
                             f"tile={self.tile}")
        if bool((self.col_kept.cpu().to(torch.int64) > widths).any()):
            raise ValueError("col_kept exceeds a range's padded column count")
        # Every column must belong to its own range and window (the kernel would zero it otherwise).
        rng = torch.repeat_interleave(torch.arange(num_ranges), widths)
        chan = self.col_chan.cpu().to(torch.int64)
        if n and bool(((chan < rng * self.group_size) | (chan >= torch.clamp((rng + 1) * self.group_size,
                                                                             max=self.num_channels))).any()):
            raise ValueError("col_chan entries must lie inside their balanced range")
        kh, kw = self.kernel_size
        if n and (int(self.col_tap.min()) < 0 or int(self.col_tap.max()) >= kh * kw):
            raise ValueError(f"col_tap entries must lie in [0, {kh * kw})")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, group_size: int = 32,
                   tile: int = 32) -> "DRColumns":
        """Build from a DW weight ``[C, 1, kh, kw]``; kept = ``mask`` (``[C, 1, kh, kw]`` or ``[C, kh, kw]``)
        if given, else ``weight != 0``. ``group_size`` channels per range, column counts padded to
        ``tile``."""
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive int, got {tile!r}")
        w, keep = _check_weight_and_mask(weight, mask)
        c, kh, kw = w.shape
        wt = w.reshape(c, kh * kw).t()  # [taps, C]: tap-major
        keep_t = keep.reshape(c, kh * kw).t()
        ptr, chans, taps, vals, kept = [0], [], [], [], []
        for start in range(0, c, group_size):
            stop = min(start + group_size, c)
            tap, local = keep_t[:, start:stop].nonzero(as_tuple=True)  # tap-major, channels ascending
            k = tap.numel()
            pad = -k % tile
            pad_chan = torch.full((pad,), start, device=w.device, dtype=local.dtype)
            chans.append(torch.cat([local + start, pad_chan]))
            taps.append(torch.cat([tap, torch.zeros(pad, device=w.device, dtype=tap.dtype)]))
            vals.append(torch.cat([wt[tap, local + start], torch.zeros(pad, device=w.device)]))
            kept.append(k)
            ptr.append(ptr[-1] + k + pad)
        dev = w.device
        return cls(
            col_ptr=torch.tensor(ptr, dtype=torch.int32, device=dev),
            col_chan=torch.cat(chans).to(torch.int32),
            col_tap=torch.cat(taps).to(torch.int32),
            col_val=torch.cat(vals).to(torch.float32).contiguous(),
            col_kept=torch.tensor(kept, dtype=torch.int32, device=dev),
            kernel_size=(kh, kw),
            group_size=group_size,
            tile=tile,
            num_channels=c,
        )

    num_ranges = _length("col_ptr", 1, "G = ceil(C / group_size).")
    num_columns = _length("col_chan", 0, "Total column count including padding.")

    def kept_per_range(self) -> list[int]:
        """K'_g of each range, before padding."""
        return [int(k) for k in self.col_kept.cpu()]

    def host_counts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(K'_g per range, kept columns per tap i * kw + j over all ranges)`` as host tuples, read from the
        tensors once and cached on this object (launch planners need them without a device sync per call;
        build a new DRColumns, e.g. with :meth:`to`, after changing ``col_kept`` or ``col_tap`` in place)."""
        cached = self.__dict__.get("_host_counts")
        if cached is None:
            kept = self.col_kept.cpu().to(torch.int64)
            ptr = self.col_ptr.cpu().to(torch.int64)
            taps = self.col_tap.cpu().to(torch.int64)
            kh, kw = self.kernel_size
            real = torch.cat([taps[int(p):int(p) + int(k)] for p, k in zip(ptr[:-1], kept)]) if kept.numel() \
                else taps[:0]
            per_tap = torch.bincount(real, minlength=kh * kw)
            cached = (tuple(int(k) for k in kept), tuple(int(v) for v in per_tap))
            self.__dict__["_host_counts"] = cached
        return cached

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight ``[C, 1, kh, kw]`` float32 (padding columns add 0)."""
        kh, kw = self.kernel_size
        dense = torch.zeros(self.num_channels, kh * kw, dtype=torch.float32, device=self.col_val.device)
        dense.index_put_((self.col_chan.long(), self.col_tap.long()), self.col_val, accumulate=True)
        return dense.reshape(self.num_channels, 1, kh, kw)

    def to(self, device: torch.device | str) -> "DRColumns":
        """A copy with every tensor on ``device``."""
        return DRColumns(self.col_ptr.to(device), self.col_chan.to(device), self.col_tap.to(device),
                         self.col_val.to(device), self.col_kept.to(device), self.kernel_size, self.group_size,
                         self.tile, self.num_channels)
