"""Training-time cost of nmfx's masked-weight op and of mask recomputation.

1. forward+backward of ``nmfx.ops.masked_linear`` vs dense ``F.linear`` on transformer shapes
   (2048 tokens; 1024->4096 and 4096->1024), eager and ``torch.compile``d, for a hard mask (STE/SDGF),
   a decaying one (MDGF, exact gradient) and SR-STE;
2. ``nm_mask`` of a 4096x4096 weight vs one elementwise pass over it (``w.abs()``);
3. ``nmfx.step`` and ``nmfx.stats`` per optimizer step on a GPT-2-width model, vs the training step.

Targets (issue "Core runtime"): masked fwd+bwd <= 1.10x dense eager and <= 1.05x dense compiled; mask
recompute <= 3x an elementwise pass for N <= 2. Ratios are measured in the same run, interleaved.

    python benchmarks/bench_masked_linear.py [--quick] [--out benchmarks/results/bench_masked_linear.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nmfx
from nmfx.ops import masked_linear

from nmfx.bench import describe, machine_info


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _sample(fn) -> float:
    """Seconds of one call after one warm-up call (samples of two functions are interleaved by the
    callers so both see the same machine noise)."""
    fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def bench_training(tokens: int, shapes, reps: int, compile_: bool) -> list[dict]:
    rows = []
    variants = {"hard (ste/sdgf)": dict(alpha=0.0, lam=None, exact=False),
                "mdgf exact": dict(alpha=0.3, lam=None, exact=True),
                "srste": dict(alpha=0.0, lam=2e-4, exact=False)}
    for in_f, out_f in shapes:
        dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
        x = torch.randn(tokens, in_f, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(out_f, in_f, device=DEVICE, dtype=dtype, requires_grad=True)
        b = torch.randn(out_f, device=DEVICE, dtype=dtype, requires_grad=True)
        mask = nmfx.nm_mask(w, "1:8")

        modes = [("eager", lambda f: f)]
        if compile_:
            modes.append(("compiled", lambda f: torch.compile(f)))
        for mode, wrap in modes:
            dense_fn = wrap(lambda: F.linear(x, w, b).sum())
            for name, v in variants.items():
                alpha = torch.tensor(v["alpha"], device=DEVICE)
                lam = None if v["lam"] is None else torch.tensor(v["lam"], device=DEVICE)
                masked_fn = wrap(lambda: masked_linear(x, w, mask, b, alpha, lam, v["exact"]).sum())
                run_dense = lambda: dense_fn().backward()
                run_masked = lambda: masked_fn().backward()
                # Interleave to share the machine's noise.
                t_dense, t_masked = [], []
                for _ in range(reps):
                    t_dense.append(_sample(run_dense))
                    t_masked.append(_sample(run_masked))
                d, m = statistics.median(t_dense), statistics.median(t_masked)
                rows.append({"shape": f"{tokens}x{in_f}->{out_f}", "mode": mode, "variant": name,
                             "dense_ms": d * 1e3, "masked_ms": m * 1e3, "ratio": m / d})
    return rows


def bench_mask(size: int, reps: int) -> list[dict]:
    w = torch.randn(size, size, device=DEVICE)
    rows = []
    for pattern in ("1:4", "2:4", "1:8", "2:8", "1:16", "1:32", "4:8"):
        t_base, t_mask = [], []
        for _ in range(reps):
            t_base.append(_sample(lambda: w.abs()))
            t_mask.append(_sample(lambda: nmfx.nm_mask(w, pattern)))
        b, m = statistics.median(t_base), statistics.median(t_mask)
        rows.append({"pattern": pattern, "elementwise_ms": b * 1e3, "mask_ms": m * 1e3, "ratio": m / b})
    return rows


def bench_step_and_stats(reps: int, quick: bool) -> dict:
    """Cost of ``nmfx.step`` and ``nmfx.stats`` per optimizer step on a GPT-2-width model vs the step."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=1 if quick else 2, n_embd=256 if quick else 768, n_head=4,
                                     vocab_size=4096, n_positions=256)
    model = nmfx.sparsify(transformers.GPT2LMHeadModel(config).to(DEVICE), "1:8", "mdgf", total_steps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (4, 64 if quick else 128), device=DEVICE)

    def train_step():
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        opt.step()

    samples = {"train_step": [], "nmfx.step": [], "nmfx.stats": []}
    for _ in range(reps):
        samples["train_step"].append(_sample(train_step))
        samples["nmfx.step"].append(_sample(lambda: nmfx.step(model)))
        samples["nmfx.stats"].append(_sample(lambda: nmfx.stats(model)))
        opt.zero_grad()
    medians = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"model": f"GPT-2 {config.n_layer} blocks x {config.n_embd}", "weights": len(nmfx.states(model)),
            "tokens": f"batch {ids.shape[0]} x {ids.shape[1]} tokens",
            **{f"{k}_ms": v for k, v in medians.items()},
            "step_fraction": medians["nmfx.step"] / medians["train_step"],
            "stats_fraction": medians["nmfx.stats"] / medians["train_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/bench_masked_linear.json")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 training shapes) on a GPU machine")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    info = machine_info()
    tokens, shapes, reps, size = (256, [(256, 1024), (1024, 256)], 3, 1024) if args.quick else (2048, [(1024, 4096), (4096, 1024)], 7, 4096)
    print(f"machine: {describe(info)}\n")
    training = bench_training(tokens, shapes, reps, compile_=not args.no_compile)
    print(f"{'shape':<18}{'mode':<10}{'variant':<17}{'dense ms':>10}{'masked ms':>11}{'ratio':>8}")
    for r in training:
        print(f"{r['shape']:<18}{r['mode']:<10}{r['variant']:<17}{r['dense_ms']:>10.1f}{r['masked_ms']:>11.1f}{r['ratio']:>8.3f}")
    masks = bench_mask(size, reps)
    print(f"\nmask recompute of a {size}x{size} fp32 weight vs one elementwise pass (w.abs())")
    print(f"{'pattern':<9}{'pass ms':>9}{'mask ms':>9}{'ratio':>8}")
    for r in masks:
        print(f"{r['pattern']:<9}{r['elementwise_ms']:>9.1f}{r['mask_ms']:>9.1f}{r['ratio']:>8.2f}")
    loop = bench_step_and_stats(reps, args.quick)
    print(f"\nper optimizer step on {loop['model']} ({loop['weights']} sparsified weights, {loop['tokens']}):")
    print(f"  training step {loop['train_step_ms']:.1f} ms | nmfx.step {loop['nmfx.step_ms']:.1f} ms "
          f"({loop['step_fraction']:.1%}) | nmfx.stats {loop['nmfx.stats_ms']:.1f} ms ({loop['stats_fraction']:.1%})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "device": str(DEVICE), "quick": args.quick, "training": training, "mask": masks,
                               "loop": loop}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
