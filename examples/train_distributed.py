"""Sparse training of the built-in TinyViT on digits with DDP or FSDP2 — one script for CPU and GPUs.

    # 2 processes on CPU (gloo):
    torchrun --nproc_per_node=2 examples/train_distributed.py --engine fsdp2
    # 8 GPUs on one node (NCCL is picked automatically when CUDA is available):
    torchrun --nproc_per_node=8 examples/train_distributed.py --engine ddp --pattern 1:16 --method mdgf

Every rank sparsifies the same model *before* wrapping it; ``nmfx.step`` after each optimizer step
refreshes masks from the full parameters (all-gathered under FSDP2), so they agree on every rank.
Checkpoints are ordinary ``state_dict``s (masks and schedule state included).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import nmfx
from nmfx.examples import TinyViT, digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--pattern", default="1:8")
    parser.add_argument("--method", default="sdgf")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--checkpoint", default="")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)  # same initial weights on every rank
    model = TinyViT().to(device)
    nmfx.sparsify(model, args.pattern, args.method, example_inputs=(x_train[:2].to(device),), total_steps=args.steps)
    if args.engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)  # same global batches on every rank; each takes its slice
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g).chunk(world)[rank]
        loss = nn.functional.cross_entropy(wrapped(x_train[idx].to(device)), y_train[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        nmfx.step(wrapped)
        if (step + 1) % 50 == 0:
            stats = nmfx.stats(model, per_layer=False)  # on every rank: it gathers FSDP2 gradients
            if rank == 0:
                print(f"step {step + 1:4d}  loss {loss.item():.3f}  sparsity {stats['nmfx/sparsity']:.3f}  "
                      f"flips {stats['nmfx/flip_rate']:.4f}  grad norm pruned/kept "
                      f"{stats['nmfx/grad_norm_pruned']:.3f}/{stats['nmfx/grad_norm_kept']:.3f}")
    wrapped.eval()
    with torch.no_grad():
        accuracy = (wrapped(x_test.to(device)).argmax(-1).cpu() == y_test).float().mean().item()
    state = model.state_dict()  # under FSDP2, parameters are DTensors (use torch.distributed.checkpoint to save sharded)
    if rank == 0:
        print(f"{args.engine} x{world}: test accuracy {accuracy:.3f} at {args.pattern} {args.method}")
        if args.checkpoint and args.engine == "ddp":
            torch.save(state, args.checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
