"""`deprune compare`: every method and seed in the table, MACs matched where promised, JSON and PNG."""
from __future__ import annotations

import json

import pytest
import torch

from deprune_plugin.app.cli import main
from deprune_plugin.app.compare import METHODS, CompareConfig, compare, format_table, plot_compare
from deprune_plugin.tp_glue.baselines import ratio_for_macs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_result():
    cfg = CompareConfig(limit=64, seeds=(0, 1), methods=tuple(METHODS), dense_epochs=1, finetune_epochs=1,
                        match_iterations=6, device="cpu", quiet=True)
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


def test_cli_compare_writes_table_json_and_png(tmp_path, capsys):
    out, fig = tmp_path / "c.json", tmp_path / "c.png"
    code = main(["compare", "--limit", "40", "--seeds", "0", "--methods", "dense", "deprune-bh",
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
