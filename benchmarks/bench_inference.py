"""Inference benchmark: nmfx's packed N:M CPU kernel vs dense ``F.linear`` vs torch CSR, per layer and
end to end.

Per layer (4096 x 4096 by default): every pattern x batch x dtype, the three timed back to back in the
same run on the same masked weight (median of several reps, ``torch.set_num_threads(threads)``):

  dense   F.linear(x, W_masked)                 (oneDNN/MKL dense GEMM on the zero-filled weight)
  csr     (W_masked.to_sparse_csr() @ x.T).T     (torch's CPU sparse CSR matmul)
  nmfx    torch.ops.nmfx.nm_linear (its C++ CPU kernel) on the stored bit-packed indices

End to end (``--e2e``): a GPT-2 with realistic widths (768, 4 blocks, random weights) decoding 16
tokens at batch 1 and 8 with its KV cache, and a ViT-B-width model (4 blocks) on 224x224 images at
batch 1 and 8, dense vs ``nmfx.to_inference(backend="cpu")`` at 1:8.

Writes ``benchmarks/results/bench_inference.json`` with the CPU model, SIMD flags, kernel ISA and load.

    python benchmarks/bench_inference.py [--quick] [--e2e] [--wait-quiet 60]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import nmfx
from nmfx.bench import LAYER_HEADER, describe, format_layer_row, layer_rows, machine_info, overhead_rows, timeit
from nmfx.kernels import cpu as nmfx_cpu

PATTERNS = ["2:4", "1:4", "2:8", "1:8", "1:16", "1:32"]
BATCHES = [1, 8, 64, 256]
DTYPES = ["float32", "bfloat16"]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_inference.json"


def end_to_end(pattern: str, quick: bool) -> list[dict]:
    """Dense vs nmfx latency of a GPT-2 decode and a ViT forward (random weights, realistic widths)."""
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    layers = 2 if quick else 4
    gpt2_config = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=8192, n_positions=256)
    vit_config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                                        intermediate_size=3072, image_size=224, patch_size=16)
    for name, model, make_inputs, run in (
        ("gpt2 decode 16 tokens", transformers.GPT2LMHeadModel(gpt2_config),
         lambda b: torch.randint(0, 8192, (b, 8)),
         lambda m, ids: m.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)),
        ("vit forward 224px", transformers.ViTForImageClassification(vit_config),
         lambda b: torch.randn(b, 3, 224, 224), lambda m, px: m(pixel_values=px)),
    ):
        model.eval()
        nmfx.sparsify(model, pattern, "ste")
        dense = copy.deepcopy(model)  # the same (masked) function as a dense model
        with torch.no_grad():
            for state_name, state in nmfx.states(dense).items():
                dense.get_parameter(state_name).mul_(state.mask)
        sparse = nmfx.to_inference(model, backend="cpu")
        for batch in (1, 8):
            inputs = make_inputs(batch)
            with torch.no_grad():
                t_dense = timeit(lambda: run(dense, inputs), 2, 5, 3.0)
                t_sparse = timeit(lambda: run(sparse, inputs), 2, 5, 3.0)
            rows.append({"model": name, "batch": batch, "pattern": pattern, "dense_ms": t_dense * 1e3,
                         "nmfx_ms": t_sparse * 1e3, "speedup": t_dense / t_sparse})
            print(f"{name:<22} batch {batch:>2} | dense {t_dense * 1e3:9.1f} ms | nmfx {t_sparse * 1e3:9.1f} ms | "
                  f"{t_dense / t_sparse:5.2f}x", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    """Speed-up over dense per pattern vs batch (fp32 and bf16 panels; CSR dashed for fp32)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[study]'): no plot")
        return
    dtypes = sorted({r["dtype"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for pattern in dict.fromkeys(r["pattern"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["dtype"] == dtype and r["pattern"] == pattern]
            line, = ax.plot([r["batch"] for r in rows], [r["speedup_vs_dense"] for r in rows], marker="o", label=pattern)
            if dtype == "float32" and all(r["speedup_vs_csr"] for r in rows):
                ax.plot([r["batch"] for r in rows], [r["speedup_vs_csr"] for r in rows], ls="--", color=line.get_color(),
                        alpha=0.6)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="batch (tokens)", ylabel="speed-up of nmfx",
               title=f"{dtype}: vs dense F.linear (solid)" + (", vs torch CSR (dashed)" if dtype == "float32" else ""))
        ax.legend(title="pattern", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    machine = result["machine"]
    fig.suptitle(f"one {result['shape'][0]}x{result['shape'][1]} layer, {result['threads']} threads, {machine['cpu']} "
                 f"(kernel ISA {result['kernel_isa']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1:8, batch 1 and 64, fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096, help="out = in = size")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated, e.g. 1:8,1:16")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--no-csr", action="store_true", help="skip torch CSR")
    parser.add_argument("--e2e", action="store_true", help="also time GPT-2 decode and a ViT end to end")
    parser.add_argument("--overhead", action="store_true",
                        help="only the per-call overhead at batch 1 (512 and 1024 wide, 1:8, fp32 and bf16); "
                             "writes results/bench_overhead.json")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --output's JSON")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each row, wait up to SECONDS for the CPUs to be idle (<10%% busy)")
    args = parser.parse_args()

    if args.plot_only:
        plot(json.loads(args.output.read_text()), args.output.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    if not nmfx_cpu.available():
        raise SystemExit(f"nmfx C++ kernel unavailable: {nmfx_cpu.build_error()}")
    if args.overhead:
        info = machine_info()
        print(f"machine: {describe(info)} | kernel ISA {nmfx_cpu.isa()} | per call, microseconds, batch 1")
        rows = []
        for row in overhead_rows():
            rows.append(row)
            print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        out = args.output.with_name("bench_overhead.json") if args.output == RESULTS else args.output
        out.write_text(json.dumps({"benchmark": "nm_linear per-call time at batch 1", "threads": args.threads,
                                   "kernel_isa": nmfx_cpu.isa(), "machine": info, "rows": rows,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        print(f"wrote {out}")
        return
    if args.quick:
        patterns, batches, dtypes = ["1:8"], [1, 64], ["float32"]
    else:
        patterns, batches, dtypes = args.patterns.split(","), [int(b) for b in args.batches.split(",")], args.dtypes.split(",")
    budget, min_reps, max_reps = (0.3, 3, 10) if args.quick else (1.0, 5, 30)
    info = machine_info()
    print(f"machine: {describe(info)} | kernel ISA {nmfx_cpu.isa()}\n")
    print(LAYER_HEADER)
    print("-" * len(LAYER_HEADER))
    rows = []
    for row in layer_rows(args.size, patterns, batches, dtypes, csr=not args.no_csr, budget_s=budget,
                          min_reps=min_reps, max_reps=max_reps, quiet_wait_s=args.wait_quiet):
        rows.append(row)
        print(format_layer_row(row), flush=True)
    e2e = []
    if args.e2e:
        print()
        e2e = end_to_end("1:8", args.quick)
    result = {"benchmark": "nmfx inference, y = x @ W^T with W N:M sparse", "shape": [args.size, args.size],
              "threads": args.threads, "quick": args.quick, "kernel_isa": nmfx_cpu.isa(),
              "index_layout": "stored bit-packed (ceil(log2 M) bits)", "machine": info,
              "timing": "median wall time per call; dense/csr/nmfx measured back to back in the same run",
              "rows": rows, "end_to_end": e2e, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}")
    plot(result, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
