"""examples/finetune_ddp.py under torchrun with 2 processes (Gloo on CPU, NCCL on GPUs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deprune_plugin import DEPruner
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.tp_glue.serialization import load, save
from deprune_plugin.core.zoo import build_model, classifier_of

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "finetune_ddp.py"
TINY = ["--limit", "128", "--steps", "4", "--batch-size", "16", "--image-size", "32"]

pytestmark = pytest.mark.slow


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # On a GPU machine with one GPU, NCCL cannot put two ranks on it: run the CPU (Gloo) path there.
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def check_lines(stdout: str) -> dict[str, bool]:
    return {m.group(1): m.group(2) == "True"
            for m in re.finditer(r"^check: (pruned taps exactly zero|replicas identical|two forwards then one backward)"
                                 r": (True|False)", stdout, re.M)}


def assert_clean_run(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = check_lines(proc.stdout)
    assert checks == {"pruned taps exactly zero": True, "replicas identical": True,
                      "two forwards then one backward": True}, proc.stdout
    model = load(out)
    convs = list(masked_convs(model))
    assert convs
    for name, conv in convs:
        assert torch.all(conv.weight[~tap_mask(conv)] == 0), name


def test_ddp_builds_prunes_and_finetunes(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = torchrun(*TINY, "--out", str(out), cwd=tmp_path)
    assert_clean_run(proc, out)


def test_ddp_finetunes_a_saved_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm", "mobilenetv2_050", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    pruner = DEPruner(model, x, dw_pruning_ratio=0.6, pw_pruning_ratio=0.3, ignored_layers=[classifier_of(model)])
    pruner.step()
    src = tmp_path / "pruned.pt"
    save(model, src, history=pruner.pruning_history(),
         arch={"source": "timm", "name": "mobilenetv2_050", "kwargs": {"num_classes": 10}}, input_shape=x.shape)
    out = tmp_path / "ddp.pt"
    proc = torchrun(*TINY, "--model-file", str(src), "--out", str(out), cwd=tmp_path)
    assert_clean_run(proc, out)
    before, after = load(src), load(out)
    for (name, a), (_, b) in zip(masked_convs(before), masked_convs(after)):
        assert torch.equal(tap_mask(a), tap_mask(b)), f"{name}: fine-tuning changed the mask"
        assert not torch.equal(a.weight, b.weight), f"{name}: DDP fine-tuning did not train it"
