"""Sparse training of the built-in TinyViT on digits with DDP or FSDP2 — one script for CPU and GPUs.

    # 2 processes on CPU (gloo):
    torchrun --nproc_per_node=2 examples/train_distributed.py --engine fsdp2
    # 8 GPUs on one node (NCCL is picked automatically when CUDA is available):
    torchrun --nproc_per_node=8 examples/train_distributed.py --engine ddp --pattern 1:16 --method mdgf

    # checkpoint every 50 steps, then resume from one (both engines; a torch.distributed.checkpoint dir):
    torchrun --nproc_per_node=2 examples/train_distributed.py --engine fsdp2 --checkpoint ckpt --checkpoint-every 50
    torchrun --nproc_per_node=2 examples/train_distributed.py --engine fsdp2 --checkpoint ckpt --resume ckpt/step-100

    # the large-model recipe: build on the meta device, sparsify, shard, to_empty, weights from rank 0, refresh
    torchrun --nproc_per_node=2 examples/train_distributed.py --engine fsdp2 --meta-init

Every rank sparsifies the same model *before* wrapping it; ``nmfx.step`` after each optimizer step
refreshes the masks. Under FSDP2 each rank stores and recomputes only its shard of each mask (a DTensor
sharded like its weight, wherever no shard boundary splits a group of M; else the mask stays whole on every
rank, with a warning), and the forward gathers the mask with the weight; the last line printed gives the
mask bytes each rank stores.
Checkpoints are ``torch.distributed.checkpoint`` directories of the model (dense weights, masks and
schedule state: nmfx's state dict holds tensors only), the optimizer and the step, written with
``get_state_dict`` / ``set_state_dict`` so the same code serves DDP and FSDP2 (sharded parameters are
saved sharded). A resumed run continues exactly like an uninterrupted one (the data order is replayed).

With ``--meta-init`` no rank ever holds the whole model before sharding: the model is built and sparsified
on the meta device (nmfx allocates its masks there and computes nothing), sharded, materialized with
``to_empty``, given its weights by ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``
from a dense state dict that only rank 0 holds (here the same seeded init as without the flag, standing in
for a pretrained checkpoint), and ``nmfx.refresh`` then computes every mask from those weights. The run is
the same as without the flag, step for step.
"""

from __future__ import annotations

import argparse
import gc
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
    parser.add_argument("--checkpoint", default="", help="directory: DCP checkpoints go to <dir>/step-<k>")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    parser.add_argument("--resume", default="", help="a <dir>/step-<k> checkpoint to continue from")
    parser.add_argument("--meta-init", action="store_true",
                        help="build and sparsify on the meta device; weights broadcast from rank 0, then nmfx.refresh")
    args = parser.parse_args()
    if args.checkpoint_every and not args.checkpoint:
        parser.error("--checkpoint-every needs --checkpoint DIR")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    x_train, y_train, x_test, y_test = digits()
    build_on = torch.device("meta") if args.meta_init else device
    torch.manual_seed(0)  # same initial weights on every rank
    with build_on:
        model = TinyViT()
    nmfx.sparsify(model, args.pattern, args.method, example_inputs=(x_train[:2].to(build_on),), total_steps=args.steps)
    if args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    if args.meta_init:
        model.to_empty(device=device)
        if not args.resume:  # a resumed run takes weights and nmfx state from its checkpoint
            load_dense_weights(model, device)
    wrapped = model
    if args.engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    start = load_checkpoint(args.resume, model, opt) if args.resume else 0
    g = torch.Generator().manual_seed(1)  # same global batches on every rank; each takes its slice
    for _ in range(start):  # replay the batches a resumed run has already seen
        torch.randint(0, len(x_train), (args.batch,), generator=g)
    for step in range(start, args.steps):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g).chunk(world)[rank]
        loss = nn.functional.cross_entropy(wrapped(x_train[idx].to(device)), y_train[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        nmfx.step(wrapped)
        if args.checkpoint and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(os.path.join(args.checkpoint, f"step-{step + 1}"), model, opt, step + 1)
        if (step + 1) % 50 == 0:
            stats = nmfx.stats(model, per_layer=False)  # on every rank: it gathers FSDP2 gradients
            if rank == 0:
                print(f"step {step + 1:4d}  loss {loss.item():.3f}  sparsity {stats['nmfx/sparsity']:.3f}  "
                      f"flips {stats['nmfx/flip_rate']:.4f}  grad norm pruned/kept "
                      f"{stats['nmfx/grad_norm_pruned']:.3f}/{stats['nmfx/grad_norm_kept']:.3f}")
    wrapped.eval()
    with torch.no_grad():
        accuracy = (wrapped(x_test.to(device)).argmax(-1).cpu() == y_test).float().mean().item()
    stored = sum(_local(state.mask).numel() for state in nmfx.states(model).values())
    whole = sum(state.mask.numel() for state in nmfx.states(model).values())
    if rank == 0:
        print(f"{args.engine} x{world}: test accuracy {accuracy:.3f} at {args.pattern} {args.method}; "
              f"mask bytes stored per rank: {stored:,} of {whole:,}")
    saved_in_loop = args.checkpoint_every and args.steps % args.checkpoint_every == 0 and args.steps > start
    if args.checkpoint and not saved_in_loop:
        save_checkpoint(os.path.join(args.checkpoint, f"step-{args.steps}"), model, opt, args.steps)
    # The model and its device mesh die before the process group, and no rank tears gloo down while another
    # still talks to it: a gloo group torn down at interpreter exit can abort the process.
    del wrapped, model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank stores of ``tensor``: its shard of a DTensor (FSDP2), else all of it."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def load_dense_weights(model: nn.Module, device: torch.device) -> None:
    """Rank 0's dense state dict (a pretrained checkpoint in a real run; here the seeded init) into every
    rank's shards, then nmfx.refresh: masks from these weights, schedules at step 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    dense = {}
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        dense = TinyViT().to(device).state_dict()
    set_model_state_dict(model, dense, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    nmfx.refresh(model)  # a collective under FSDP2: every rank calls it


def save_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Model (weights + nmfx state), optimizer and step as a torch.distributed.checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)}, checkpoint_id=path)
    if dist.get_rank() == 0:
        print(f"checkpoint: {path}")


def load_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Restore what :func:`save_checkpoint` wrote into the (already sparsified and wrapped) model; returns the
    step. nmfx checks the incoming nmfx state before anything is copied into the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not os.path.isdir(path):
        raise SystemExit(f"--resume {path}: no such checkpoint directory")
    model_state, optim_state = get_state_dict(model, opt)
    # DCP loads into the tensors it is given: clones, so a refused checkpoint leaves the model untouched
    model_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model_state.items()}
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at step {int(state['step'])}")
    return int(state["step"])


if __name__ == "__main__":
    main()
