"""Per-layer inference benchmark: nmfx's packed N:M CPU kernel vs dense F.linear vs torch CSR.

For one [out, in] = 4096 x 4096 layer, every pattern x batch x dtype, all three are timed in the same
run on the same masked weight (median of several reps, torch.set_num_threads(threads)):

  dense   F.linear(x, W_masked)                      (oneDNN/MKL dense GEMM on the zero-filled weight)
  csr     (W_masked.to_sparse_csr() @ x.T).T          (torch's CPU sparse CSR matmul)
  nmfx    torch.ops.nmfx.nm_linear(..., backend="cpu") with the stored bit-packed indices

Prints a table of times and speedups and writes benchmarks/results/bench_inference.json, recording the
CPU model and flags from /proc/cpuinfo, the kernel's ISA and the load average (timings on a shared
machine are noisy: compare rows measured in the same run only).

    python benchmarks/bench_inference.py            # full table (a few minutes)
    python benchmarks/bench_inference.py --quick    # smoke run: 1:8 only, batch 1 and 64, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from nmfx.inference_ops import nm_linear
from nmfx.kernels import cpu as nmfx_cpu
from nmfx.packed import pack_nm

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

PATTERNS = ["2:4", "1:4", "2:8", "1:8", "1:16", "1:32"]
BATCHES = [1, 8, 64, 256]
DTYPES = ["float32", "bfloat16"]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_inference.json"


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "model": platform.processor(), "flags": [], "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info["model"] = value.strip()
                elif key == "flags" and not info["flags"]:
                    info["flags"] = value.split()
    except OSError:
        pass
    simd = [f for f in info["flags"] if f.startswith(("avx", "fma", "f16c", "amx", "sse4"))]
    info["simd_flags"] = sorted(simd)
    return info


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` (from /proc/stat); 0.0 where unavailable."""
    try:
        def sample():
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            return sum(v), v[3] + v[4]

        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_quiet(max_busy: float, max_wait_s: float) -> float:
    """Block until other processes leave the CPUs mostly idle (2-thread timings on a shared 2-core
    machine are otherwise dominated by descheduled OpenMP threads). Returns the last busy fraction."""
    deadline = time.monotonic() + max_wait_s
    busy = _cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = _cpu_busy()
    return busy


def timeit(fn, min_reps: int, max_reps: int, budget_s: float) -> float:
    """Median seconds of fn() over reps chosen to fit budget_s (after 2 warmups)."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1:8, batch 1 and 64, fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096, help="out = in = size")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated, e.g. 1:8,1:16")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--no-csr", action="store_true", help="skip torch CSR")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="before each row, wait up to SECONDS for other processes to leave the CPUs idle (<10%% busy)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        patterns, batches, dtypes = ["1:8"], [1, 64], ["float32"]
    else:
        patterns = args.patterns.split(",")
        batches = [int(b) for b in args.batches.split(",")]
        dtypes = args.dtypes.split(",")
    budget, min_reps, max_reps = (0.3, 3, 10) if args.quick else (1.0, 5, 30)
    if not nmfx_cpu.available():
        raise SystemExit(f"nmfx C++ kernel unavailable: {nmfx_cpu.build_error()}")

    size = args.size
    dense_w = torch.randn(size, size)
    rows = []
    header = f"{'pattern':>7} {'dtype':>8} {'batch':>5} | {'dense ms':>9} {'csr ms':>9} {'nmfx ms':>9} | {'x dense':>7} {'x csr':>7}"
    print(header)
    print("-" * len(header))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for pat in patterns:
            packed = pack_nm(dense_w.to(dtype), pat)
            w = packed.unpack()
            try:
                w_csr = w.to_sparse_csr()
            except RuntimeError:
                w_csr = None
            n, m, bits = packed.pattern.n, packed.pattern.m, packed.index_bits
            for batch in batches:
                x = torch.randn(batch, size).to(dtype)
                y_ref = F.linear(x.double(), w.double())

                def run_nmfx():
                    return nm_linear(x, packed.values, packed.indices, None, n, m, bits, "cpu")

                err = (run_nmfx().double() - y_ref).abs().max().item()
                busy = wait_quiet(0.10, args.wait_quiet) if args.wait_quiet > 0 else None
                t_nmfx = timeit(run_nmfx, min_reps, max_reps, budget)
                t_dense = timeit(lambda: F.linear(x, w), min_reps, max_reps, budget)
                t_csr = None
                csr_note = None
                if w_csr is not None and not args.no_csr:
                    xt = x.t().contiguous()
                    try:
                        (w_csr @ xt).t()
                        t_csr = timeit(lambda: (w_csr @ xt).t(), min_reps, max_reps, budget)
                    except RuntimeError as exc:  # e.g. bf16 CSR matmul unsupported on CPU
                        csr_note = str(exc).splitlines()[0][:160]
                row = {
                    "pattern": pat,
                    "dtype": dtype_name,
                    "batch": batch,
                    "dense_ms": t_dense * 1e3,
                    "csr_ms": None if t_csr is None else t_csr * 1e3,
                    "nmfx_ms": t_nmfx * 1e3,
                    "speedup_vs_dense": t_dense / t_nmfx,
                    "speedup_vs_csr": None if t_csr is None else t_csr / t_nmfx,
                    "nmfx_max_abs_err_vs_fp64": err,
                    "nmfx_weight_bytes": packed.nbytes,
                    "dense_weight_bytes": w.numel() * w.element_size(),
                    "cpu_busy_before": busy,
                }
                if csr_note:
                    row["csr_note"] = csr_note
                rows.append(row)
                csr_ms = f"{row['csr_ms']:9.3f}" if t_csr is not None else f"{'n/a':>9}"
                x_csr = f"{row['speedup_vs_csr']:6.2f}x" if t_csr is not None else f"{'n/a':>7}"
                print(
                    f"{pat:>7} {dtype_name:>8} {batch:>5} | {row['dense_ms']:9.3f} {csr_ms} {row['nmfx_ms']:9.3f} | "
                    f"{row['speedup_vs_dense']:6.2f}x {x_csr}",
                    flush=True,
                )

    result = {
        "benchmark": "nmfx per-layer inference, y = x @ W^T, W N:M sparse",
        "shape": [size, size],
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "kernel_isa": nmfx_cpu.isa(),
        "index_layout": "stored bit-packed (ceil(log2 M) bits)",
        "cpu": cpu_info(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "timing": "median wall time per call; dense/csr/nmfx measured back to back in the same run",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}  (CPU: {result['cpu']['model']}; ISA {result['kernel_isa']}; loadavg {result['loadavg']})")


if __name__ == "__main__":
    main()
