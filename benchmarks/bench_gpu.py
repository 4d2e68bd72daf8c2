"""GPU speed of nmfx's Triton N:M kernels (``nmfx.kernels.triton_nm``) against dense cuBLAS.

1. Per layer: ``[out, in]`` = 4096x4096, 11008x4096 (the MLP up-projection of a 7B Llama, i.e. in=4096,
   out=11008), 8192x8192; batch 1, 16 (decode: GEMV kernel) and 256, 4096 (prefill: tiled tl.dot
   kernel); patterns 2:4, 1:8, 1:16, 1:32; fp16. Compared with dense ``F.linear`` (cuBLAS) and, for
   2:4, ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores; "n/a" where unsupported).
   Kernel time is measured by replaying a CUDA graph of calls (CUDA events, median of replays), so
   Python launch overhead is excluded; the graph cycles through enough copies of the weight to exceed
   3x the L2 cache, so decode timings are DRAM-bound as in a real model, not L2 hits. ``eager_us``
   is one plain Python call (launch overhead included), for batch 1. Every nmfx result is checked
   against the dense product of the unpacked weight (``max_rel_err``).
2. End to end (if ``transformers`` is importable): greedy decode of a small Llama built from a config
   with random weights, dense vs every decoder-layer linear replaced by an nmfx 1:8 packed linear
   (a simple module swap inside this script; the lowering pass is not used). Eager, no CUDA graphs,
   so per-token host overhead counts for both.

Autotuning happens inside the first call of each (batch bucket, out, in, pattern) and is excluded from
the timings. Prints tables and writes ``benchmarks/results/bench_gpu.json`` (device name included).

    python benchmarks/bench_gpu.py [--quick] [--no-e2e] [--out benchmarks/results/bench_gpu.json]

Budget: about 5 minutes on an H100 (most of it Triton compiling and autotuning), ``--quick`` < 2 min.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYERS = [(4096, 4096), (11008, 4096), (8192, 8192)]  # (out, in)
BATCHES = [1, 16, 256, 4096]
PATTERNS = ["2:4", "1:8", "1:16", "1:32"]


def _fail(msg: str) -> None:
    print(f"bench_gpu.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _graph_time_ms(calls, reps: int = 15) -> float:
    """Median GPU time (ms) of one call, replaying a CUDA graph that runs every callable once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and autotune) outside the capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    del graph
    return statistics.median(samples)


def _eager_time_ms(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _copies(nbytes: int, l2: int) -> int:
    return max(1, min(64, math.ceil(3 * l2 / max(nbytes, 1))))


def bench_layers(layers, batches, patterns, l2: int) -> list[dict]:
    from nmfx.kernels.triton_nm import nm_linear_triton
    from nmfx.packed import pack_nm
    from nmfx.pattern import nm_mask

    dev = torch.device("cuda")
    rows = []
    for out_f, in_f in layers:
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.float16) / math.sqrt(in_f)
        dense_bytes = w.numel() * 2
        dense_ws = [w] + [w.clone() for _ in range(_copies(dense_bytes, l2) - 1)]
        packs = {p: pack_nm(w, p) for p in patterns}
        semi = None
        if "2:4" in patterns:
            try:
                from torch.sparse import to_sparse_semi_structured

                masked = torch.where(nm_mask(w, "2:4"), w, torch.zeros_like(w))
                semi = [to_sparse_semi_structured(masked) for _ in range(_copies(dense_bytes // 2, l2))]
            except Exception as exc:  # noqa: BLE001 - report, keep going
                semi = f"{type(exc).__name__}: {exc}"[:200]
        for batch in batches:
            x = torch.randn(batch, in_f, device=dev, dtype=torch.float16)
            t_dense = _graph_time_ms([lambda wi=wi: F.linear(x, wi) for wi in dense_ws])
            flops = 2 * batch * in_f * out_f
            base = dict(out=out_f, inp=in_f, batch=batch)
            rows.append(dict(base, impl="dense cuBLAS", pattern="-", us=t_dense * 1e3, speedup=1.0,
                             tflops=flops / t_dense / 1e9, weight_mb=dense_bytes / 2**20,
                             eager_us=_eager_time_ms(lambda: F.linear(x, w)) * 1e3 if batch == 1 else None))
            if semi is not None:
                row = dict(base, impl="torch 2:4 semi-structured", pattern="2:4", weight_mb=None)
                if isinstance(semi, str):
                    row.update(us=None, speedup=None, error=semi)
                else:
                    try:
                        t = _graph_time_ms([lambda s=s: F.linear(x, s) for s in semi])
                        row.update(us=t * 1e3, speedup=t_dense / t, tflops=flops / t / 1e9)
                    except Exception as exc:  # noqa: BLE001
                        row.update(us=None, speedup=None, error=f"{type(exc).__name__}: {exc}"[:200])
                rows.append(row)
            for pat, packed in packs.items():
                n, m, bits = packed.pattern.n, packed.pattern.m, packed.index_bits
                copies = [packed] + [
                    type(packed)(packed.values.clone(), packed.indices.clone(), packed.pattern, packed.shape, packed.dtype)
                    for _ in range(_copies(packed.nbytes, l2) - 1)
                ]
                calls = [lambda p=p: nm_linear_triton(x, p.values, p.indices, None, n, m, bits) for p in copies]
                t0 = time.perf_counter()
                y = calls[0]()  # first call autotunes this key
                tune_s = time.perf_counter() - t0
                ref = F.linear(x, packed.unpack())
                err = float(((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)))
                t = _graph_time_ms(calls)
                rows.append(dict(base, impl="nmfx triton", pattern=pat, us=t * 1e3, speedup=t_dense / t,
                                 tflops=flops / t / 1e9, weight_mb=packed.nbytes / 2**20,
                                 gbps=(packed.nbytes + x.numel() * 2 + batch * out_f * 2) / t / 1e6,
                                 max_rel_err=err, first_call_s=tune_s,
                                 eager_us=_eager_time_ms(calls[0]) * 1e3 if batch == 1 else None))
            print(_fmt_rows([r for r in rows if r["out"] == out_f and r["inp"] == in_f and r["batch"] == batch]), flush=True)
        del dense_ws, packs, semi
        torch.cuda.empty_cache()
    return rows


def _fmt_rows(rows) -> str:
    lines = []
    for r in rows:
        us = "n/a" if r.get("us") is None else f"{r['us']:9.1f}"
        sp = "" if r.get("speedup") is None else f"{r['speedup']:6.2f}x"
        extra = []
        if r.get("gbps"):
            extra.append(f"{r['gbps']:7.0f} GB/s")
        if r.get("eager_us"):
            extra.append(f"eager {r['eager_us']:.1f} us")
        if r.get("max_rel_err") is not None:
            extra.append(f"err {r['max_rel_err']:.1e}")
        if r.get("error"):
            extra.append(r["error"][:80])
        lines.append(f"{r['out']:>6}x{r['inp']:<6} b={r['batch']:<5} {r['impl']:<26} {r['pattern']:>5} {us} us {sp:>8}  "
                     + "  ".join(extra))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# End-to-end decode
# --------------------------------------------------------------------------------------------------
class _PackedLinear(torch.nn.Module):
    """A Linear whose weight is an nmfx packed N:M weight (this script's own swap, not the lowering pass)."""

    def __init__(self, linear: torch.nn.Linear, pattern: str):
        super().__init__()
        import nmfx.inference_ops  # noqa: F401  (registers torch.ops.nmfx.nm_linear and its CUDA kernel)
        from nmfx.packed import pack_nm

        p = pack_nm(linear.weight.detach(), pattern)
        self.register_buffer("values", p.values)
        self.register_buffer("indices", p.indices)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.n, self.m, self.bits = p.pattern.n, p.pattern.m, p.index_bits

    def forward(self, x):
        # The op as a model calls it: on CUDA tensors the dispatcher runs its Triton kernel.
        return torch.ops.nmfx.nm_linear(x, self.values, self.indices, self.bias, self.n, self.m, self.bits)


def bench_e2e(pattern: str, layers: int, new_tokens: int, prompt: int) -> dict:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"transformers not importable: {exc}"}
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")

    def decode_s() -> float:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kw)  # warm-up (and autotune)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    dense_s = decode_s()
    swapped = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _PackedLinear(child, pattern))
                    swapped += 1
    torch.cuda.empty_cache()
    nm_s = decode_s()
    return {"config": {"hidden": 2048, "intermediate": 5632, "layers": layers, "heads": 32, "kv_heads": 4},
            "pattern": pattern, "linears_swapped": swapped, "prompt": prompt, "new_tokens": new_tokens,
            "dense_ms_per_token": dense_s / new_tokens * 1e3, "nmfx_ms_per_token": nm_s / new_tokens * 1e3,
            "speedup": dense_s / nm_s}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, batch 1 and 256, 2:4 and 1:8")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Llama decode")
    ap.add_argument("--e2e-layers", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_gpu.json"))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        _fail("needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    try:
        import triton
    except ImportError:
        _fail("needs triton (pip install triton); nothing was measured.")
    from nmfx.kernels import triton_nm

    why = triton_nm.unavailable_reason(torch.empty(1, device="cuda"))
    if why:
        _fail(f"the Triton kernels cannot run here: {why}")

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    info = {"device": torch.cuda.get_device_name(0), "sm": f"{props.major}.{props.minor}", "l2_mb": l2 / 2**20,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    print(f"# {info['device']} (sm_{props.major}{props.minor}, L2 {l2 / 2**20:.0f} MB) | torch {info['torch']} | "
          f"triton {info['triton']} | CUDA {info['cuda']}")
    layers, batches, patterns = LAYERS, BATCHES, PATTERNS
    if args.quick:
        layers, batches, patterns = LAYERS[:1], [1, 256], ["2:4", "1:8"]
    t0 = time.perf_counter()
    rows = bench_layers(layers, batches, patterns, l2)
    e2e = None
    if not args.no_e2e:
        e2e = bench_e2e("1:8", args.e2e_layers, new_tokens=64, prompt=32)
        print("\n# end-to-end greedy decode, batch 1:", json.dumps(e2e, indent=1))
    result = {"machine": info, "layers": rows, "e2e": e2e, "seconds": time.perf_counter() - t0,
              "notes": "us: median GPU time per call from CUDA-graph replays (no launch overhead), weights "
                       "rotated over >= 3x L2; eager_us: one Python call incl. launch overhead; fp16."}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
