"""One-shot pruning of a densely pretrained LM with nmfx.prune, then a short sparse fine-tune.

Model and data: the accuracy study's LM task (``benchmarks/accuracy.py``: a byte-level decoder,
``ByteLM``, on the Python standard library's source; metric: validation perplexity, chance = 256).
It is pretrained densely once (``--pretrain-steps``) and the checkpoint is cached (safetensors, keyed
by the configuration; a cached file that does not match is retrained, never trusted).

For every pattern (2:4, 1:8, 1:16) and criterion (magnitude, Wanda, SparseGPT) the dense checkpoint is
pruned one-shot with ``calibration`` windows of the training split, then fine-tuned for
``--finetune-steps`` with SR-STE and with MDGF (linear, fitted decay), each through
``nmfx.prune(..., method=<method>, total_steps=<steps>)``, ``--repeats`` times (each repeat draws its
own calibration sample and fine-tune data order). Recorded: perplexity dense / right after pruning /
after each fine-tune (mean ± std over the repeats), and the wall time and peak extra resident memory
of the pruning call (VmHWM after resetting it through /proc/self/clear_refs; None where Linux does not
allow that) -- also on a GPT-2-small-sized MLP (768 -> 3072 -> 768), where the Hessians are large.

    python benchmarks/bench_prune.py                 # writes benchmarks/results/bench_prune.json
    python benchmarks/bench_prune.py --quick         # smoke run (tiny budgets), to --out

Timings come from whatever machine runs it (the JSON names the CPU and its flags; the committed run
was taken on a shared machine, so they are indicative only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nmfx  # noqa: E402
from nmfx.bench import machine_info, process_memory  # noqa: E402
from benchmarks.accuracy import LMTask, lr_factor  # noqa: E402

HERE = Path(__file__).resolve().parent
PATTERNS = ("2:4", "1:8", "1:16")
CRITERIA = ("magnitude", "wanda", "sparsegpt")
FINETUNE = (("srste", {}), ("mdgf", {"decay": "linear"}))
LM = dict(dim=128, depth=2, heads=4, context=64, batch=16, lr=3e-3, weight_decay=0.01,
          corpus_chars=1_000_000, val_windows=64)


def pretrained(task: LMTask, steps: int, cache: Path, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The densely pretrained model: from the cache when a matching, readable file is there, else trained."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([task.cfg, task.info["sha256"], steps, seed, torch.__version__],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache / f"bytelm-{key}.safetensors"
    model = task.model()
    if path.exists():
        try:
            state = load_file(str(path))
            expected = model.state_dict()
            if state.keys() == expected.keys() and all(state[k].shape == expected[k].shape for k in state) \
                    and all(torch.isfinite(v).all() for v in state.values()):
                model.load_state_dict(state)
                with safe_open(str(path), framework="pt") as f:
                    seconds = (f.metadata() or {}).get("pretrain_seconds")
                try:
                    seconds = float(seconds) if seconds is not None else None
                except ValueError:
                    seconds = None
                return model, {"checkpoint": str(path), "cached": True, "pretrain_seconds": seconds}
        except Exception as error:  # an unreadable cache entry is retrained, not trusted
            print(f"ignoring cached checkpoint {path}: {type(error).__name__}: {error}", file=sys.stderr)
    torch.manual_seed(seed)
    model = task.model()
    start = time.perf_counter()
    train(task, model, steps, task.cfg["lr"], seed)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"pretrain_seconds": str(round(seconds, 1))})
    return model, {"checkpoint": str(path), "cached": False, "pretrain_seconds": round(seconds, 1)}


def train(task: LMTask, model: torch.nn.Module, steps: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=task.cfg["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps)
        loss = task.loss(model, task.batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        nmfx.step(model)
    model.eval()


def calibration(task: LMTask, windows: int, batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    ctx = task.cfg["context"]
    starts = torch.randint(0, len(task.train) - ctx, (windows,), generator=gen).tolist()
    rows = torch.stack([task.train[s: s + ctx] for s in starts])
    return list(rows.split(batch))


def _reset_peak() -> Optional[int]:
    """Reset the process's peak RSS to its current RSS (``clear_refs``); the RSS in KiB, or None if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    memory = process_memory()
    return None if memory is None else memory["rss_bytes"] // 1024


def _peak_kib() -> Optional[int]:
    memory = process_memory()
    return None if memory is None else memory["peak_bytes"] // 1024


def fresh_copy(task: LMTask, dense: torch.nn.Module) -> torch.nn.Module:
    model = task.model()
    model.load_state_dict(dense.state_dict())
    return model.eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = dict(LM, **({"corpus_chars": 200_000, "val_windows": 32} if args.quick else {}))
    task = LMTask(cfg, "cpu")
    dense, provenance = pretrained(task, args.pretrain_steps, Path(args.cache).expanduser(), args.seed)
    dense_ppl = task.evaluate(dense)
    print(f"dense perplexity {dense_ppl:.3f} ({provenance})", flush=True)
    records = []
    for pattern in args.patterns:
        for criterion in CRITERIA:
            record: dict[str, Any] = {"pattern": pattern, "criterion": criterion, "ppl_dense": dense_ppl, "runs": []}
            for repeat in range(args.repeats):
                seed = args.seed + repeat  # the calibration sample and the fine-tune's data order
                batches = calibration(task, args.calibration, 16, seed)
                model = fresh_copy(task, dense)
                before = _reset_peak()
                start = time.perf_counter()
                nmfx.prune(model, pattern, batches, criterion)
                seconds = time.perf_counter() - start
                peak = _peak_kib() if before is not None else None
                run_record = {"seed": seed, "prune_seconds": round(seconds, 3),
                              "prune_peak_extra_mib": None if peak is None else round((peak - before) / 1024, 1),
                              "ppl_pruned": task.evaluate(model), "pruned_layers": len(nmfx.states(model))}
                for method, options in FINETUNE:
                    tuned = nmfx.prune(fresh_copy(task, dense), pattern, batches, criterion, method=method,
                                       total_steps=args.finetune_steps, **options)
                    start = time.perf_counter()
                    train(task, tuned, args.finetune_steps, args.finetune_lr, seed + 1)
                    run_record[f"ppl_{method}"] = task.evaluate(tuned)
                    run_record[f"{method}_seconds"] = round(time.perf_counter() - start, 1)
                    if any(s.schedule.alpha != 0 for s in nmfx.states(tuned).values()):
                        raise RuntimeError(f"{method}: the fine-tuned model did not end at its hard mask")
                print(json.dumps({"pattern": pattern, "criterion": criterion, **run_record}), flush=True)
                record["runs"].append(run_record)
            for key in ("ppl_pruned", "ppl_srste", "ppl_mdgf", "prune_seconds"):
                values = [r[key] for r in record["runs"]]
                record[key] = statistics.fmean(values)
                record[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            records.append(record)
    scaling = wide_layer_costs(args) if not args.quick else []
    machine = machine_info()
    return {
        "benchmark": "bench_prune", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu": machine["cpu"], "flags": machine["simd_flags"], "cores": os.cpu_count(),
                    "torch_threads": args.threads,
                    "note": "shared machine (other jobs running): timings are indicative only"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": {"lm": cfg, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                   "finetune_lr": args.finetune_lr, "calibration_windows": args.calibration,
                   "seed": args.seed, "repeats": args.repeats, "finetune": [m for m, _ in FINETUNE], "corpus": task.info, **provenance},
        "records": records,
        "wide_layers": scaling,
    }


class _WideMLP(torch.nn.Module):
    """A GPT-2-small-sized MLP (768 -> 3072 -> 768), to see the cost of pruning at a realistic width."""

    def __init__(self, dim: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def wide_layer_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time and peak extra memory of pruning a 768 -> 3072 -> 768 MLP at 2:4 with 2,048 calibration tokens."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(256, 768, generator=gen) for _ in range(8)]
    rows = []
    for criterion in CRITERIA:
        torch.manual_seed(args.seed)
        model = _WideMLP().eval()
        before = _reset_peak()
        start = time.perf_counter()
        nmfx.prune(model, "2:4", batches, criterion, include=["up", "down"])
        seconds = time.perf_counter() - start
        peak = _peak_kib() if before is not None else None
        rows.append({"criterion": criterion, "pattern": "2:4", "layers": "768x3072 + 3072x768", "tokens": 2048,
                     "prune_seconds": round(seconds, 2),
                     "prune_peak_extra_mib": None if peak is None else round((peak - before) / 1024, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(result: dict[str, Any]) -> str:
    lines = ["| pattern | criterion | ppl one-shot | ppl + SR-STE | ppl + MDGF | prune time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["records"]:
        cells = [f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in ("ppl_pruned", "ppl_srste", "ppl_mdgf", "prune_seconds")]
        lines.append(f"| {r['pattern']} | {r['criterion']} | " + " | ".join(cells) + " |")
    dense = result["records"][0]["ppl_dense"] if result["records"] else float("nan")
    text = f"Dense perplexity {dense:.2f}.\n\n" + "\n".join(lines)
    if result.get("wide_layers"):
        text += ("\n\n| criterion (768->3072->768 MLP, 2:4, 2,048 tokens) | prune time (s) | prune peak extra (MiB) |\n"
                 "| --- | --- | --- |\n" + "\n".join(f"| {r['criterion']} | {r['prune_seconds']:.2f} | "
                                                   f"{r['prune_peak_extra_mib']} |" for r in result["wide_layers"]))
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows (of the LM's context)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="calibration samples / fine-tune data orders per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "nmfx", "bench_prune"))
    parser.add_argument("--out", default=str(HERE / "results" / "bench_prune.json"))
    args = parser.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 60 if args.quick else 1500
    if args.finetune_steps is None:
        args.finetune_steps = 10 if args.quick else 100
    if args.quick:
        args.calibration = min(args.calibration, 16)
        args.repeats = min(args.repeats, 2)
    start = time.perf_counter()
    result = run(args)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
