"""Benchmark helpers shared by ``python -m nmfx bench`` and ``benchmarks/``: machine facts, a quiet-CPU
wait, a median timer, and the per-layer inference comparison (nmfx kernel vs dense vs torch CSR)."""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["machine_info", "process_memory", "describe", "wait_quiet", "timeit", "time_interleaved", "layer_rows", "format_layer_row", "LAYER_HEADER"]

_SIMD_PREFIXES = ("avx", "fma", "f16c", "amx", "sse4")


def machine_info() -> dict:
    """CPU model, SIMD flags (from /proc/cpuinfo), threads, torch version, GPU if any."""
    info = {"machine": platform.machine(), "cpu": platform.processor(), "simd_flags": [],
            "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info["cpu"] = value.strip()
                elif key == "flags" and not info["simd_flags"]:
                    info["simd_flags"] = sorted(flag for flag in value.split() if flag.startswith(_SIMD_PREFIXES))
    except OSError:
        pass
    info["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def process_memory() -> Optional[dict]:
    """This process's resident memory now and its peak, in bytes (``{"rss_bytes", "peak_bytes"}``: ``VmRSS`` and
    ``VmHWM`` of /proc/self/status); None where that file cannot be read."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS:", "VmHWM:")))
        return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "peak_bytes": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        return None


def describe(info: dict) -> str:
    flags = " ".join(info["simd_flags"]) or "none"
    return f"{info['cpu']} | {info['threads']} threads | {flags} | torch {info['torch']}"


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` (from /proc/stat); 0.0 where unavailable."""
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
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs mostly idle; on a shared 2-core
    machine 2-thread timings are otherwise dominated by descheduled threads. Returns the busy fraction."""
    deadline = time.monotonic() + max_wait_s
    busy = _cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = _cpu_busy()
    return busy


def timeit(fn: Callable[[], object], min_reps: int = 5, max_reps: int = 30, budget_s: float = 1.0) -> float:
    """Median seconds of ``fn()`` over as many repetitions as fit ``budget_s`` (after 2 warm-ups)."""
    fn()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = int(max(min_reps, min(max_reps, budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_interleaved(fns: dict, min_reps: int = 5, max_reps: int = 30, budget_s: float = 1.0) -> dict:
    """Median seconds of each ``fns[name]()``, the repetitions interleaved (a, b, c, a, b, c, ...) so a
    noisy neighbour or a clock change hits every contender alike; reps sized so the slowest fits
    ``budget_s``."""
    slowest = 0.0
    for fn in fns.values():
        fn()
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start)
    reps = int(max(min_reps, min(max_reps, budget_s / max(slowest, 1e-6))))
    samples: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


LAYER_HEADER = (f"{'pattern':>7} {'dtype':>8} {'batch':>5} | {'dense ms':>9} {'csr ms':>9} {'nmfx ms':>9} | "
                f"{'x dense':>7} {'x csr':>7} {'x fp32':>7}")


def layer_rows(size: int, patterns: Sequence[str], batches: Sequence[int], dtypes: Sequence[str],
               backend: str = "auto", csr: bool = True, budget_s: float = 1.0, min_reps: int = 5,
               max_reps: int = 30, quiet_wait_s: float = 0.0) -> Iterator[dict]:
    """One row per (dtype, pattern, batch): a ``size x size`` layer as ``nm_linear`` vs dense ``F.linear``
    on the same masked weight vs its ``to_sparse_csr()`` matmul, timed back to back in the same run.
    ``backend``: the op a packed layer lowered with it calls (``"auto"``: ``nmfx::nm_linear``, the C++
    kernel on the CPU; ``"reference"``: ``nmfx::nm_linear_reference``)."""
    from nmfx.inference_ops import OP_FOR_BACKEND
    from nmfx.packed import pack_nm

    nm_linear = OP_FOR_BACKEND[backend]

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    dense_w = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for pattern in patterns:
            packed = pack_nm(dense_w.to(dtype), pattern)
            # The same kept weights in fp32, so a bf16/fp16 row also times the fp32 kernel in its run.
            packed32 = pack_nm(packed.unpack().float(), pattern) if dtype != torch.float32 else None
            w = packed.unpack()
            try:
                w_csr: Optional[torch.Tensor] = w.to_sparse_csr() if csr else None
            except RuntimeError:
                w_csr = None
            n, m, bits = packed.pattern.n, packed.pattern.m, packed.index_bits
            for batch in batches:
                x = torch.randn(batch, size).to(dtype)
                run = lambda: nm_linear(x, packed.values, packed.indices, None, n, m, bits)  # noqa: E731
                error = (run().double() - F.linear(x.double(), w.double())).abs().max().item()
                contenders = {"nmfx": run, "dense": lambda: F.linear(x, w)}
                if packed32 is not None:
                    x32 = x.float()
                    contenders["nmfx_fp32"] = lambda: nm_linear(x32, packed32.values, packed32.indices, None, n, m, bits)
                note = None
                if w_csr is not None:
                    xt = x.t().contiguous()
                    try:
                        (w_csr @ xt).t()
                        contenders["csr"] = lambda: (w_csr @ xt).t()
                    except RuntimeError as exc:  # bf16 CSR matmul is not implemented on the CPU
                        note = str(exc).splitlines()[0][:160]
                busy = wait_quiet(0.10, quiet_wait_s) if quiet_wait_s > 0 else None
                t = time_interleaved(contenders, min_reps, max_reps, budget_s * len(contenders))
                t_csr = t.get("csr")
                row = {"pattern": pattern, "dtype": dtype_name, "batch": batch, "dense_ms": t["dense"] * 1e3,
                       "csr_ms": None if t_csr is None else t_csr * 1e3, "nmfx_ms": t["nmfx"] * 1e3,
                       "speedup_vs_dense": t["dense"] / t["nmfx"],
                       "speedup_vs_csr": None if t_csr is None else t_csr / t["nmfx"],
                       "nmfx_max_abs_err_vs_fp64": error, "nmfx_weight_bytes": packed.nbytes,
                       "dense_weight_bytes": w.numel() * w.element_size(), "cpu_busy_before": busy}
                if "nmfx_fp32" in t:
                    row["nmfx_fp32_ms"] = t["nmfx_fp32"] * 1e3
                    row["speedup_vs_nmfx_fp32"] = t["nmfx_fp32"] / t["nmfx"]
                if note:
                    row["csr_note"] = note
                yield row


def overhead_rows(widths: Sequence[int] = (512, 1024), pattern: str = "1:8", dtypes: Sequence[str] = ("float32", "bfloat16"),
                  calls: int = 200, budget_s: float = 1.0) -> Iterator[dict]:
    """Per-call time at batch 1 of a ``width x width`` layer, interleaved: the op as a model calls it
    (``torch.ops.nmfx.nm_linear`` under ``no_grad``, and under ``inference_mode``), the Python wrapper ``nmfx.inference_ops.nm_linear``,
    the raw extension function (no dispatcher), and dense ``F.linear``; each timed over ``calls`` calls.
    What the op costs above the extension function is the per-call dispatch overhead."""
    from nmfx.inference_ops import nm_linear
    from nmfx.kernels import cpu
    from nmfx.packed import pack_nm

    ext = cpu.load()
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for width in widths:
            packed = pack_nm(torch.randn(width, width, generator=torch.Generator().manual_seed(0)).to(dtype), pattern)
            w = packed.unpack()
            x = torch.randn(1, width).to(dtype)
            args = (x, packed.values, packed.indices, None, packed.pattern.n, packed.pattern.m, packed.index_bits)
            op = torch.ops.nmfx.nm_linear.default

            def loop(fn, *a, mode=torch.no_grad):
                def run():
                    with mode():
                        for _ in range(calls):
                            fn(*a)
                return run

            fns = {"op": loop(op, *args), "op_inference_mode": loop(op, *args, mode=torch.inference_mode),
                   "wrapper": loop(nm_linear, *args), "dense": loop(F.linear, x, w)}
            if ext is not None:
                fns["extension"] = loop(ext.nm_linear, *args, 0)
            t = time_interleaved(fns, 5, 40, budget_s * len(fns))
            row = {"width": width, "dtype": dtype_name, "pattern": pattern, "batch": 1}
            row.update({f"{name}_us": sec / calls * 1e6 for name, sec in t.items()})
            yield row


def format_layer_row(row: dict) -> str:
    csr_ms = f"{row['csr_ms']:9.3f}" if row["csr_ms"] is not None else f"{'n/a':>9}"
    x_csr = f"{row['speedup_vs_csr']:6.2f}x" if row["speedup_vs_csr"] is not None else f"{'n/a':>7}"
    vs32 = f"{row['speedup_vs_nmfx_fp32']:6.2f}x" if "speedup_vs_nmfx_fp32" in row else f"{'':>7}"
    return (f"{row['pattern']:>7} {row['dtype']:>8} {row['batch']:>5} | {row['dense_ms']:9.3f} {csr_ms} "
            f"{row['nmfx_ms']:9.3f} | {row['speedup_vs_dense']:6.2f}x {x_csr} {vs32}")
