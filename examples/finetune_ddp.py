"""Fine-tune a DEPrune-pruned model with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/finetune_ddp.py --model-file pruned.pt --steps 200
    torchrun --nproc_per_node=2 examples/finetune_ddp.py            # builds and prunes a small model

Uses NCCL on GPUs (one per process) and Gloo on CPU. Every replica loads (or builds and prunes, with the
same seed) the same model; DDP then broadcasts rank 0's parameters and buffers, tap masks included, and
all-reduces gradients that the masks' hooks have already zeroed at pruned taps, so pruned taps stay exactly
zero on every replica. Each step is a two-view step (the batch and its mirror image: two forwards through
the DDP model, then one backward), the pattern of consistency and contrastive losses. At the end rank 0
prints three check lines (parsed by tests/test_ddp.py):

    check: pruned taps exactly zero: True (...)
    check: replicas identical: True (...)
    check: two forwards then one backward: True (...)

and saves the fine-tuned model (rebuildable with ``deprune_plugin.tp_glue.serialization.load``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from deprune_plugin import DEPruner
from deprune_plugin.app.data import make_datasets
from deprune_plugin.core.masks import masked_convs, tap_mask
from deprune_plugin.tp_glue.serialization import load, save
from deprune_plugin.app.training import reinit_classifier_
from deprune_plugin.core.zoo import build_model, classifier_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-file", default=None, help="a file saved by `deprune prune` (default: build one)")
    p.add_argument("--model", default="mobilenetv3_small_050", help="timm model to build when no --model-file")
    p.add_argument("--dw", type=float, default=0.78, help="DW ratio when building")
    p.add_argument("--pw", type=float, default=0.5, help="PW ratio when building")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="at most N training images")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ddp_finetuned.pt")
    return p.parse_args(argv)


def load_or_build(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The pruned model and what :func:`save` needs to write it again (arch, history, input shape)."""
    if args.model_file:
        model = load(args.model_file)
        # The rebuild recipe of a deprune-v1 file (see deprune_plugin.tp_glue.serialization): plain data.
        payload = torch.load(args.model_file, map_location="cpu", weights_only=True)
        if "arch" not in payload:
            raise SystemExit(f"{args.model_file} was saved without arch=; cannot re-save it rebuildable")
        return model, {"arch": payload["arch"], "history": payload["history"], "input_shape": payload["input_shape"]}
    torch.manual_seed(args.seed)  # same seed on every rank: identical weights, identical pruning
    model = reinit_classifier_(build_model("timm", args.model, num_classes=10))
    shape = (1, 3, args.image_size, args.image_size)
    pruner = DEPruner(model, torch.randn(shape), dw_pruning_ratio=args.dw, pw_pruning_ratio=args.pw,
                      ignored_layers=[classifier_of(model)])
    pruner.step()
    arch = {"source": "timm", "name": args.model, "kwargs": {"num_classes": 10}}
    return model, {"arch": arch, "history": pruner.pruning_history(), "input_shape": shape}


@torch.no_grad()
def pruned_taps_nonzero(model: nn.Module) -> tuple[int, int]:
    """(non-zero weights at pruned taps, pruned taps) over all masked DW convs."""
    nonzero, total = 0, 0
    for _, conv in masked_convs(model):
        pruned = ~tap_mask(conv)
        nonzero += int((conv.weight[pruned] != 0).sum())
        total += int(pruned.sum())
    return nonzero, total


@torch.no_grad()
def replicas_identical(model: nn.Module, device: torch.device) -> tuple[bool, float]:
    """Gather every rank's flattened parameters and tap masks and compare them bit for bit with rank 0's.
    Returns (identical, this rank's checksum).

    BatchNorm running statistics are left out: DDP broadcasts buffers at the start of each forward, so
    after the last step every rank holds the statistics of its own last batch (rank 0's are saved)."""
    masks = [tap_mask(conv) for _, conv in masked_convs(model)]
    flat = torch.cat([t.detach().reshape(-1).double() for t in list(model.parameters()) + masks])
    flat = flat.to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered), float(flat.sum())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model, recipe = load_or_build(args)
        model.to(device).train()
        ddp = DDP(model, device_ids=[local_rank] if cuda else None)
        train_set, _, _ = make_datasets("digits", args.image_size, args.limit, args.seed)
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        step, epoch, two_view_steps = 0, 0, 0
        while step < args.steps:
            sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                # two forwards, one backward: the masks must not write weights between the forwards
                loss = 0.5 * (loss_fn(ddp(x), y) + loss_fn(ddp(torch.flip(x, dims=[3])), y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                two_view_steps += 1
                if rank == 0 and (step % 10 == 0 or step == args.steps):
                    print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
                if step >= args.steps:
                    break
            epoch += 1

        nonzero, pruned = pruned_taps_nonzero(model)
        counts = torch.tensor([nonzero, pruned], dtype=torch.float64, device=device)
        dist.all_reduce(counts)  # summed over replicas: every one must be clean
        identical, checksum = replicas_identical(model, device)
        ok_zero = counts[0].item() == 0 and counts[1].item() > 0
        if rank == 0:
            print(f"check: pruned taps exactly zero: {ok_zero} ({int(counts[0].item())} non-zero of "
                  f"{int(counts[1].item())} pruned taps over {world} replicas)", flush=True)
            print(f"check: replicas identical: {identical} ({world} replicas, checksum {checksum:.10e})", flush=True)
            print(f"check: two forwards then one backward: {two_view_steps == args.steps} "
                  f"({two_view_steps} two-view steps of {args.steps})", flush=True)
            model.cpu()
            save(model, args.out, history=recipe["history"], arch=recipe["arch"], input_shape=recipe["input_shape"],
                 extra={"ddp": {"world_size": world, "steps": args.steps, "backend": dist.get_backend()}})
            print(f"saved {args.out}", flush=True)
        dist.barrier()
        return 0 if ok_zero and identical else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
