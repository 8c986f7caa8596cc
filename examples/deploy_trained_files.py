"""Do the files `deprune prune` writes deploy? Makes small trained files across models, data and seeds, then
for each: loads it, runs ``accelerate()`` (CPU runtimes) and ``export()`` (ONNX), and records whether every
edit and every installed CPU runtime was kept, whether the file exported, and how far the fp32 model itself
is from its float64 value.

    python examples/deploy_trained_files.py --json examples/results/deploy_trained_files.json

Short runs (1 pre-train and 1 fine-tune epoch on 120 images): the point is numerics of trained, pruned and
recalibrated models, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from deprune_plugin import accelerate, export, load
from deprune_plugin.accel.runtimes import RUNTIMES, runtime_available
from deprune_plugin.accel.selfcheck import check_inputs
from deprune_plugin.app.cli import main as deprune_main

RUNS = [  # (model, data, seed, extra flags)
    ("mobilenetv2_050", "digits", 0, []), ("mobilenetv2_050", "digits", 1, []),
    ("mobilenetv2_050", "digits", 2, ["--taps", "geometry"]),
    ("mobilenetv3_small_050", "digits", 0, []), ("mobilenetv3_small_050", "digits", 1, ["--variant", "B"]),
    ("tinynet_e", "digits", 0, []), ("mnasnet_small", "digits", 0, []),
    ("efficientnet_b0", "digits", 0, ["--pw", "0.3"]),
    ("mobilenetv2_050", "folder", 0, []), ("mobilenetv3_small_050", "folder", 1, []),
    ("lcnet_050", "digits", 0, []), ("mobilenetv2_100", "digits", 3, ["--steps", "2"]),
]


def image_folder(root: Path, classes: int = 4, per_class: int = 30, size: int = 40) -> Path:
    """A small ImageFolder tree of coloured noise whose mean colour depends on the class."""
    g = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(g.normal(60 * c + 40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root / "train"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_file(path: Path, out_dir: Path) -> dict:
    model = load(path).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs, _ = check_inputs(model, (x,))
    row = {"source_vs_float64": [i.describe_source() for i in inputs]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = accelerate(model, example_inputs=x)
    rep = fast.deprune_report
    installed = [r for r in RUNTIMES if runtime_available(r)[0]]
    row.update(replaced=len(rep.replaced()), left=rep.left(),
               runtimes_kept=[k for k, v in rep.runtimes.items() if "ms" in v and k != "torch"],
               runtimes_installed=installed, backend=rep.backend,
               warnings=[str(w.message)[:300] for w in caught if issubclass(w.category, RuntimeWarning)])
    try:
        export(model, out_dir / (path.stem + ".onnx"), example_inputs=x)
        row["export"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, this is what the script measures
        row["export"] = f"{type(e).__name__}: {e}"
    row["ok"] = not row["left"] and set(installed) <= set(row["runtimes_kept"]) and row["export"] == "ok"
    return row


def run(json_path: str | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = image_folder(tmp / "folder")
        for model, data, seed, extra in tqdm(RUNS, desc="files"):
            out = tmp / f"{model}_{data}_{seed}.pt"
            argv = ["prune", "--paper", "--latency-size", "32", "--model", model,
                    "--data", "digits" if data == "digits" else str(folder),
                    "--limit", "120", "--image-size", "32", "--pretrain-epochs", "1", "--finetune-epochs", "1",
                    "--seed", str(seed), "--latency-reps", "1", "--latency-batch", "1", "--quiet", "--device", "cpu",
                    "--out", str(out), "--no-figure", *extra]
            status = deprune_main(argv)
            row = {"model": model, "data": data, "seed": seed, "flags": extra, "prune_status": status}
            if status == 0:
                row.update(check_file(out, tmp))
            else:
                row["ok"] = False
            rows.append(row)
            print(f"{model:<24} {data:<7} seed {seed}: ok={row['ok']} replaced={row.get('replaced')} "
                  f"left={len(row.get('left', {}))} runtimes={row.get('runtimes_kept')} export={row.get('export')}",
                  flush=True)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} files deploy with every edit, every runtime and an export")
    if json_path:
        Path(json_path).write_text(json.dumps({"command": "python examples/deploy_trained_files.py --json "
                                               + json_path, "machine": cpu_name(),
                                               "torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    run(ap.parse_args().json)
