"""FastDWConv's cached compact formats and ``nn.DataParallel`` replicas.

``torch.nn.parallel.replicate`` makes each replica with ``module._replicate_for_data_parallel()`` (a shallow
copy, never through ``_apply``) and then swaps its buffers for copies on the replica's device. Before, the
replica kept the original's cached formats, so its kernels read the original device's tensors. replicate()
itself needs CUDA devices; these tests drive ``_replicate_for_data_parallel()`` directly on CPU and swap the
buffers the way replicate() does.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from deprune_plugin.accel import FastDWConv
from deprune_plugin.kernels import CompactTaps, DRColumns, emulation_available

C = 12


def _layer(seed: int, backend: str = "torch") -> FastDWConv:
    g = torch.Generator().manual_seed(seed)
    keep = torch.Generator().manual_seed(99)  # the same mask for every seed: same buffer shapes
    mask = torch.rand(C, 1, 3, 3, generator=keep) < 0.6
    weight = torch.randn(C, 1, 3, 3, generator=g) * mask
    return FastDWConv(weight, torch.randn(C, generator=g), mask, (1, 1), (1, 1, 1, 1), (1, 1), "relu",
                      backend=backend, group_size=4, tile=4)


def _replicate(module: FastDWConv, buffers_from: FastDWConv | None = None) -> FastDWConv:
    """What ``torch.nn.parallel.replicate`` does to one module: shallow replica, then every buffer replaced
    by a copy "on the replica's device" (here: a clone, or the buffers of another layer of the same shape)."""
    replica = module._replicate_for_data_parallel()
    source = dict((buffers_from or module).named_buffers())
    for name in list(module._buffers):
        setattr(replica, name, source[name].detach().clone())
    return replica


def _tensors(formats: dict) -> dict[str, torch.Tensor]:
    out = {"bias": formats["bias"]}
    for key in ("taps", "dr"):
        for f in dataclasses.fields(formats[key]):
            value = getattr(formats[key], f.name)
            if isinstance(value, torch.Tensor):
                out[f"{key}_{f.name}"] = value
    return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _own(module: FastDWConv) -> set[int]:
    return {_storage(b) for b in module.buffers()}


def test_replica_rebuilds_its_formats_from_its_own_buffers():
    orig = _layer(0)
    before = orig.formats()
    before_tensors = {k: v.clone() for k, v in _tensors(before).items()}
    replica = _replicate(orig)

    formats = replica.formats()
    for name, t in _tensors(formats).items():
        if name == "bias":
            continue  # an fp32 copy of the bias buffer (already fp32 here: the same storage)
        assert _storage(t) in _own(replica), f"{name} still points at the original's tensor"
        assert _storage(t) not in _own(orig), name
        torch.testing.assert_close(t, before_tensors[name], rtol=0, atol=0)
    assert _storage(formats["bias"]) == _storage(replica.bias)
    # the original is unaffected: same cached formats, same tensors
    assert orig.formats() is before
    for name, t in _tensors(orig.formats()).items():
        assert t is _tensors(before)[name] and torch.equal(t, before_tensors[name])


def test_replica_with_other_buffers_uses_them():
    """A replica whose buffers are other tensors (another device in DataParallel; here another layer's values)
    builds its formats from them, not from the original's."""
    orig, other = _layer(0), _layer(1)
    orig.formats()
    replica = _replicate(orig, buffers_from=other)
    got, want = replica.formats(), other.formats()
    for name, t in _tensors(want).items():
        assert torch.equal(_tensors(got)[name], t), name
    assert not torch.equal(got["taps"].tap_val, orig.formats()["taps"].tap_val)
    assert isinstance(got["taps"], CompactTaps) and isinstance(got["dr"], DRColumns)
    assert got["taps"].kernel_size == (3, 3) and got["dr"].num_channels == C
    torch.testing.assert_close(got["taps"].to_dense(), want["taps"].to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(got["dr"].to_dense(), want["dr"].to_dense(), rtol=0, atol=0)


def test_replicas_skip_the_content_checks_the_original_ran(monkeypatch):
    """The original checks its buffers once; the replicas (made anew on every DataParallel forward) copy
    them and rebuild without the checks' device syncs. A state-dict load into a replica checks again."""
    calls = []
    for cls in (CompactTaps, DRColumns):
        post_init = cls.__post_init__

        def counting(self, _post_init=post_init, _name=cls.__name__):
            calls.append(_name)
            _post_init(self)

        monkeypatch.setattr(cls, "__post_init__", counting)
    orig = _layer(0)
    calls.clear()
    for _ in range(3):
        _replicate(orig).formats()
    assert calls == ["CompactTaps", "DRColumns"]  # the original, once; none for the three replicas
    replica = _replicate(orig)
    replica.load_state_dict(_layer(1).state_dict())
    calls.clear()
    replica.formats()
    assert calls == ["CompactTaps", "DRColumns"]


def test_replica_follows_later_moves_and_the_original_keeps_its_own():
    orig = _layer(0)
    orig.formats()
    replica = _replicate(orig)
    replica.formats()
    replica.double()  # through _apply: a new generation, rebuilt (the fp32 bit patterns are untouched)
    assert replica.weight.dtype == torch.float64
    assert replica.formats()["taps"].tap_val.dtype == torch.float32
    assert _storage(replica.formats()["taps"].tap_val) in _own(replica)
    assert orig.weight.dtype == torch.float32 and _storage(orig.formats()["taps"].tap_val) in _own(orig)


def test_deepcopy_and_meta_still_work():
    orig = _layer(0)
    orig.formats()
    for src in (orig, _replicate(orig)):
        clone = copy.deepcopy(src)
        assert _storage(clone.formats()["taps"].tap_val) in _own(clone)
        assert torch.equal(clone.formats()["taps"].tap_val, orig.formats()["taps"].tap_val)
        meta = copy.deepcopy(src).to("meta")
        assert all(b.device.type == "meta" for b in meta.buffers())
        x = torch.randn(2, C, 7, 9)
        assert meta(x.to("meta")).shape == src(x).shape
    meta_replica = _replicate(copy.deepcopy(orig).to("meta"))
    assert all(b.device.type == "meta" for b in meta_replica.buffers())


emu_ok, emu_why = emulation_available()


@pytest.mark.skipif(not emu_ok, reason=emu_why)
def test_replica_kernels_compute_with_the_replica_buffers():
    """Through the kernels (host emulation): a replica holding other tensors computes with them."""
    orig, other = _layer(0, "emu"), _layer(1, "emu")
    x = torch.randn(2, C, 8, 9)
    with torch.no_grad():
        torch.testing.assert_close(orig.run_kernel("direct", x), orig.dense(x), rtol=1e-5, atol=1e-5)
        replica = _replicate(orig, buffers_from=other)
        for name in ("direct", "dr"):
            torch.testing.assert_close(replica.run_kernel(name, x), other.dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(orig.run_kernel("direct", x), orig.dense(x), rtol=1e-5, atol=1e-5)
