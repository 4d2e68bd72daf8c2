"""Sharded mask storage under FSDP2 (2 gloo ranks on the CPU): per-rank mask bytes and time per training step
with each rank storing only its shard of every mask (nmfx now) vs every rank storing every whole mask (before:
the shard-local refresh, masks gathered as bytes at every recompute).

Model: ``--layers`` x Linear(w, w) + Linear(w, 8), all sparsified at 1:8 with ``ste`` (a mask recompute at every
step), ``fully_shard`` per layer and root. Both layouts run in the same two processes on identically initialised
models, timed in alternating rounds (this machine is shared); medians are reported. A step is forward + backward
+ SGD + ``nmfx.step``; ``nmfx.step`` is also timed alone. The whole-mask layout is forced by making
``NMState.shardable`` answer False (exactly the code path a weight whose shards split groups of M takes).

    python benchmarks/bench_fsdp_masks.py --widths 512 1024 --out benchmarks/results/bench_fsdp_masks.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nmfx
from nmfx.bench import machine_info

WORLD = 2
LAYOUTS = ("sharded", "whole")


def _model(width: int, layers: int, whole: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)], nn.Linear(width, 8))
    nmfx.sparsify(model, "1:8", "ste", include="*")
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    if whole:
        for state in nmfx.states(model).values():
            state.shardable = lambda weight: False  # the fallback path: masks stay whole on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forced fallback warns that the masks stay whole
        nmfx.step(model)  # lays the masks out (and warms up)
    return model


def _mask_bytes(model: nn.Module) -> int:
    total = 0
    for state in nmfx.states(model).values():
        mask = state.mask
        local = mask.to_local() if hasattr(mask, "to_local") else mask
        total += local.numel() * local.element_size()
    return total


def _worker(rank: int, port: int, widths: list[int], layers: int, rounds: int, batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = []
    for width in widths:
        models = {layout: _model(width, layers, layout == "whole") for layout in LAYOUTS}
        opts = {layout: torch.optim.SGD(model.parameters(), lr=1e-3) for layout, model in models.items()}
        x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
        step_ms = {layout: [] for layout in LAYOUTS}
        refresh_ms = {layout: [] for layout in LAYOUTS}
        for _ in range(rounds):
            for layout in LAYOUTS:
                model, opt = models[layout], opts[layout]
                dist.barrier()
                start = time.perf_counter()
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                nmfx.step(model)
                dist.barrier()
                middle = time.perf_counter()
                nmfx.step(model)
                dist.barrier()
                end = time.perf_counter()
                step_ms[layout].append((middle - start) * 1e3)
                refresh_ms[layout].append((end - middle) * 1e3)
        masks = {layout: {k: v.clone() for k, v in nmfx.masks(model).items()} for layout, model in models.items()}
        same = all(torch.equal(masks["sharded"][k], masks["whole"][k]) for k in masks["sharded"])
        row = {"width": width, "params": layers * (width * width + width) + 8 * width + 8,
               "full_mask_bytes": sum(s.mask.numel() for s in nmfx.states(models["sharded"]).values()),
               "same_masks": same}
        for layout in LAYOUTS:
            row[layout] = {"mask_bytes_per_rank": _mask_bytes(models[layout]),
                           "train_step_ms": round(statistics.median(step_ms[layout]), 2),
                           "nmfx_step_ms": round(statistics.median(refresh_ms[layout]), 2)}
        results.append(row)
        del models, opts
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="rows of the input per rank")
    parser.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(port, args.widths, args.layers, args.rounds, args.batch, part),
                           nprocs=WORLD, start_method="spawn")
        with open(part) as f:
            rows = json.load(f)
    report = {"benchmark": "bench_fsdp_masks", "world": WORLD, "backend": "gloo", "threads_per_rank": 1,
              "pattern": "1:8", "method": "ste", "layers": args.layers, "batch_per_rank": args.batch,
              "rounds": args.rounds, "machine": machine_info(), "results": rows}
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
