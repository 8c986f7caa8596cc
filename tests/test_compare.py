"""`deprune compare`: every method and seed in the table, MACs matched where promised, JSON and PNG."""
from __future__ import annotations

import json

import pytest
import torch

from deprune_plugin.app.cli import main
from deprune_plugin.app.compare import (METHODS, CompareConfig, RunResult, compare, format_table, pareto_front,
                                        plot_compare, plot_latency, proxy_tracking)
from deprune_plugin.core.cost import count_cost
from deprune_plugin.core.latency import register_target
from deprune_plugin.tp_glue.baselines import ratio_for_macs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_result():
    cfg = CompareConfig(limit=64, seeds=(0, 1), methods=tuple(METHODS), dense_epochs=1, finetune_epochs=1,
                        match_iterations=6, device="cpu", quiet=True, latency_target=None)
    return compare(cfg)


def test_every_method_and_seed_has_a_run_and_a_summary_row(tiny_result):
    runs = tiny_result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in (0, 1))
    assert [row["method"] for row in tiny_result["summary"]] == list(METHODS)
    for row in tiny_result["summary"]:
        assert row["seeds"] == [0, 1]
        mine = [r["top1_finetuned"] for r in runs if r["method"] == row["method"]]
        assert row["top1_finetuned"][0] == pytest.approx(sum(mine) / 2)
        assert 0.0 <= row["top1_finetuned"][0] <= 100.0
    table = format_table(tiny_result)
    for m in METHODS:
        assert f"| {m} |" in table


def test_macs_order_and_the_channel_match(tiny_result):
    macs = {row["method"]: row["macs"][0] for row in tiny_result["summary"]}
    assert macs["dense"] > macs["dw-only"] > macs["deprune-b"]
    assert macs["dense"] > macs["pw-only"] > macs["deprune-b"]
    assert macs["channels"] == pytest.approx(macs["deprune-bh"], rel=0.05)  # matched MACs (6 bisection steps)
    assert macs["2:4"] < 0.6 * macs["dense"]
    recal = [r for r in tiny_result["runs"] if r["method"] == "deprune-bh"]
    assert all(r["top1_recalibrated"] is not None for r in recal)
    assert all(r["top1_recalibrated"] is None for r in tiny_result["runs"] if r["method"] == "dense")


def test_plot_and_json_are_written(tiny_result, tmp_path):
    plot_compare(tiny_result, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    json.dumps(tiny_result, allow_nan=False)


def test_ratio_for_macs_bisects_to_the_closest_ratio():
    # a made-up MAC curve: 1000 * (1 - r)^2
    r = ratio_for_macs(lambda r: round(1000 * (1 - r) ** 2), 250)
    assert r == pytest.approx(0.5, abs=0.01)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="methods"):
        CompareConfig(methods=("dense", "magic"))
    with pytest.raises(ValueError, match="taps"):
        CompareConfig(taps="size")


@register_target("_compare_macs")
class _MacsTarget:
    """Modelled, deterministic: 1 ns per MAC (so the test's latencies do not depend on machine load)."""

    name, modelled, alignment, taps_reason = "_compare_macs", True, 8, "modelled CPU"

    def seconds(self, module, inputs):
        return count_cost(module, tuple(inputs)).macs * inputs[0].shape[0] * 1e-9 + 1e-9


def test_latency_methods_pair_with_their_reference_and_plot(tmp_path):
    cfg = CompareConfig(limit=40, seeds=(0, 1), methods=("dense", "channels-0.3", "expanded-0.25",
                                                          "latency:channels-0.3"),
                        dense_epochs=1, finetune_epochs=0, device="cpu", quiet=True,
                        latency_target="_compare_macs", latency_size=32, latency_reps=3)
    res = compare(cfg)
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    assert all(runs[("dense", s)]["latency_ratio"] == 1.0 for s in (0, 1))
    assert all(runs[(m, s)]["latency_ratio"] > 0 for m in cfg.methods for s in (0, 1))
    assert all(runs[("latency:channels-0.3", s)]["proxy_loss"] >= 0 for s in (0, 1))
    assert runs[("channels-0.3", 0)]["proxy_loss"] is None
    # expanded-R keeps the streams: fewer MACs than dense, more than channel pruning at a higher ratio
    assert runs[("channels-0.3", 0)]["macs"] < runs[("expanded-0.25", 0)]["macs"] < runs[("dense", 0)]["macs"]
    (pair,) = res["paired"]
    diffs = [runs[("latency:channels-0.3", s)]["top1_finetuned"] - runs[("channels-0.3", s)]["top1_finetuned"]
             for s in (0, 1)]
    assert pair["reference"] == "channels-0.3" and pair["top1_difference"] == pytest.approx(diffs)
    assert "paired, latency:channels-0.3 - channels-0.3" in format_table(res)
    plot_latency(res, str(tmp_path / "lat.png"))
    assert (tmp_path / "lat.png").read_bytes()[:8] == PNG_MAGIC


def test_pareto_front_by_hand():
    pts = [(1.0, 97.0), (0.9, 95.0), (0.8, 96.0), (0.7, 90.0), (0.85, 94.0)]
    # (0.9, 95) is beaten by (0.8, 96); (0.85, 94) by (0.8, 96); the rest trade latency for accuracy
    assert pareto_front(pts) == [3, 2, 0]


def test_proxy_tracking_spearman_by_hand():
    def run(loss, top1, seed):
        return RunResult("latency-0.7", seed, 0, 0, 0.0, None, top1, 0.7, loss)
    runs = [run(0.1, 97.0, 0), run(0.2, 96.0, 0), run(0.3, 95.0, 0), run(0.1, 90.0, 1), run(0.2, 92.0, 1),
            run(0.3, 91.0, 1)]
    t = proxy_tracking(runs)
    assert t["spearman_per_seed"][0] == pytest.approx(-1.0)   # perfectly reversed ranks
    assert t["spearman_per_seed"][1] == pytest.approx(0.5)    # ranks (0,2,1) against (0,1,2)
    assert proxy_tracking(runs[:2]) is None


def test_latency_method_names_are_checked():
    with pytest.raises(ValueError, match="earlier in methods"):
        CompareConfig(methods=("dense", "latency:channels-0.3", "channels-0.3"))
    with pytest.raises(ValueError, match="methods"):
        CompareConfig(methods=("channels-1.5",))
    with pytest.raises(ValueError, match="latency_target"):
        CompareConfig(methods=("latency-0.7",), latency_target=None)


def test_cli_compare_writes_table_json_and_png(tmp_path, capsys):
    out, fig = tmp_path / "c.json", tmp_path / "c.png"
    code = main(["compare", "--limit", "40", "--seeds", "0", "--methods", "dense", "deprune-bh",
                 "--latency-target", "torch", "--latency-size", "32",
                 "--dense-epochs", "1", "--finetune-epochs", "0", "--device", "cpu", "--quiet",
                 "--json", str(out), "--figure", str(fig)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| deprune-bh |" in text and "| dense |" in text
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["runs"]} == {"dense", "deprune-bh"}
    assert fig.read_bytes()[:8] == PNG_MAGIC
    assert torch.isfinite(torch.tensor([r["top1_finetuned"] for r in data["runs"]])).all()


def test_cli_compare_bad_method_is_one_line_exit_2(tmp_path, capsys):
    assert main(["compare", "--methods", "nope", "--quiet"]) == 2
    assert "methods" in capsys.readouterr().err
