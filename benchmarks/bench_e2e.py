"""End-to-end CPU inference: nmfx's packed model vs the *plain* model a user would otherwise run.

    python benchmarks/bench_e2e.py                    # Llama-style 1024x8 and GPT-2-small shapes, fp32 + bf16
    python benchmarks/bench_e2e.py --quick            # tiny widths (what tests/test_bench_e2e.py runs)
    python benchmarks/bench_e2e.py --compile          # also torch.compile both sides (compiled vs compiled)

For each architecture one random model is built; a copy is sparsified at 1:8 (``ste``: hard masks from
step 0, every block projection; the LM head stays dense as nmfx's policy does) and lowered with
``nmfx.to_inference``; the **baseline is the original transformers model holding the same masked
weights** (``W * m``), with no nmfx code in it — the same function, computed densely. Both run in fp32 and
in bf16 (the plain model cast with ``.to(torch.bfloat16)``: oneDNN's dense bf16, AMX where the CPU has
it; nmfx with ``to_inference(dtype=torch.bfloat16)``). Timings are medians of interleaved repetitions
(plain, nmfx, plain, nmfx, ...), so load changes hit both alike.

Measured per configuration: greedy decode (``generate``, ``max_new_tokens`` tokens, KV cache) at
batch 1/8/32 and a prefill forward of 128/512 tokens at batch 1; tokens/s; whether nmfx's greedy tokens
equal the plain model's; weight bytes of each model; and the **byte-ratio limit** — the bytes a decode
step streams (every weight but the input-embedding table, of which a step reads a few rows) of the plain
model over nmfx's, the speed-up a purely memory-bound batch-1 decode could reach — with the head dense
(as measured) and with the head at the pattern too (``include=["head"]``; computed, not timed).

Memory (``memory`` rows): each side is saved and loaded the way it is deployed, in a fresh process —
the plain model with ``save_pretrained`` / ``from_pretrained(dir, dtype=...)`` (transformers' own
meta-device loading), nmfx's with ``nmfx.save`` / ``nmfx.load(file, model_built_on_meta)`` — and the process's
resident memory is read from ``/proc/self/status``: the growth after loading and one 4-token forward
(which touches every weight: transformers may map a checkpoint lazily) (``VmRSS``, after ``gc.collect()``)
and the peak (``VmHWM``), both over the process's RSS once torch,
transformers, nmfx and the architecture's modules are imported (and the nmfx C++ kernel is loaded from
the cache), so they count the loaded model and what loading it took, not the libraries.
Writes ``benchmarks/results/bench_e2e.json`` with the machine's CPU model and SIMD flags.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nmfx
from nmfx.bench import describe, machine_info, time_interleaved, wait_quiet

RESULTS = Path(__file__).resolve().parent / "results" / "bench_e2e.json"


def configs(quick: bool) -> dict[str, tuple[str, dict]]:
    """name -> (transformers config class, kwargs)."""
    if quick:
        return {"llama-tiny": ("LlamaConfig", dict(hidden_size=128, num_hidden_layers=2, intermediate_size=352,
                                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                                   tie_word_embeddings=False))}
    return {
        "llama 1024x8": ("LlamaConfig", dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816,
                                             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                             tie_word_embeddings=False, max_position_embeddings=1024)),
        "gpt2-small shapes": ("GPT2Config", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                                 n_positions=1024)),
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads in full: every weight except input embedding tables (a step gathers only
    a few of their rows) unless the table is also the LM head's weight (tied)."""
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    gathered = {id(m.weight) for m in model.modules()
                if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight}
    seen, total = set(gathered), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def head_bytes_ratio(model: torch.nn.Module, pattern: nmfx.Pattern, dtype: torch.dtype) -> tuple[int, int]:
    """(dense bytes, packed bytes) of the LM head if it were sparsified too."""
    head = model.get_output_embeddings()
    out_features, in_features = head.weight.shape
    size = torch.tensor([], dtype=dtype).element_size()
    bits = max(1, (pattern.m - 1).bit_length())
    kept = in_features // pattern.m * pattern.n
    return out_features * in_features * size, out_features * (kept * size + (kept * bits + 7) // 8)


def byte_limits(plain: torch.nn.Module, packed: torch.nn.Module, pattern: str, dtype: torch.dtype) -> dict:
    """Weight bytes of both models, and the byte-ratio limit of a memory-bound batch-1 decode step: bytes
    streamed per token by the plain model over nmfx's, with the head dense (as run) and at the pattern."""
    streamed_plain, streamed_nmfx = streamed_bytes(plain), streamed_bytes(packed)
    head_dense, head_packed = head_bytes_ratio(plain, nmfx.Pattern.parse(pattern), dtype)
    return {"plain_weight_bytes": weight_bytes(plain), "nmfx_weight_bytes": weight_bytes(packed),
            "plain_streamed_bytes": streamed_plain, "nmfx_streamed_bytes": streamed_nmfx,
            "byte_ratio_limit_head_dense": streamed_plain / streamed_nmfx,
            "byte_ratio_limit_head_sparse": streamed_plain / (streamed_nmfx - head_dense + head_packed)}


def recompute_limits(path: Path, quick: bool) -> None:
    """Rewrite the byte-ratio fields of an existing result (computed from the models, no timing)."""
    result = json.loads(path.read_text())
    for name, (config_name, kwargs) in configs(quick).items():
        plain, sparse = build(config_name, kwargs, result["rows"][0]["pattern"])
        for dtype_name in sorted({r["dtype"] for r in result["rows"] if r["model"] == name}):
            dtype = getattr(torch, dtype_name)
            plain_d = plain if dtype == torch.float32 else copy.deepcopy(plain).to(dtype)
            packed = nmfx.to_inference(sparse, backend="cpu", dtype=None if dtype == torch.float32 else dtype)
            limits = byte_limits(plain_d, packed, result["rows"][0]["pattern"], dtype)
            for row in result["rows"]:
                if row["model"] == name and row["dtype"] == dtype_name:
                    row.update(limits)
    result["limits_recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(result, indent=1))
    print(f"rewrote the byte-ratio limits in {path}")


def build(config_name: str, config_kwargs: dict, pattern: str, seed: int = 0):
    """(plain model with the masked weights, sparsified model) — the same function."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**config_kwargs)
    plain = transformers.AutoModelForCausalLM.from_config(config).eval()
    sparse = copy.deepcopy(plain)
    nmfx.sparsify(sparse, pattern, "ste")
    with torch.no_grad():
        for name, state in nmfx.states(sparse).items():
            plain.get_parameter(name).copy_(sparse.get_parameter(name) * state.mask)
    return plain, sparse


_LOAD_AND_MEASURE = r"""
import gc, json, sys, torch, transformers
import nmfx
from nmfx.bench import process_memory
from nmfx.kernels import cpu

side, path, config_name, kwargs, dtype = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
transformers.logging.set_verbosity_error()
config = getattr(transformers, config_name)(**kwargs)
with torch.device("meta"):  # imports the architecture's modules before the baseline is read
    transformers.AutoModelForCausalLM.from_config(config)
cpu.load(build=False)
gc.collect()
base = process_memory()["rss_bytes"]
if side == "plain":  # what a user runs: transformers' own loading (meta init, then the checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
else:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    nmfx.load(path, model)
with torch.no_grad():  # a forward touches every weight (transformers may map the checkpoint lazily)
    assert torch.isfinite(model.eval()(torch.zeros(1, 4, dtype=torch.long)).logits).all()
gc.collect()
print(json.dumps({key: value - base for key, value in process_memory().items()}))
"""


def memory_row(name: str, config_name: str, config_kwargs: dict, plain, packed, pattern: str, dtype: torch.dtype) -> dict:
    """Resident memory of each side loaded as deployed, each in a fresh process (see the module docstring)."""
    dtype_name = str(dtype).removeprefix("torch.")
    row = {"model": name, "dtype": dtype_name, "pattern": pattern, "mode": "memory"}
    with tempfile.TemporaryDirectory() as tmp:
        plain_path, nmfx_path = os.path.join(tmp, "plain"), os.path.join(tmp, "nmfx.safetensors")
        plain.save_pretrained(plain_path)
        nmfx.save(packed, nmfx_path)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        for side, path in (("plain", plain_path), ("nmfx", nmfx_path)):
            done = subprocess.run([sys.executable, "-c", _LOAD_AND_MEASURE, side, path, config_name,
                                   json.dumps(config_kwargs), dtype_name], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory measurement ({side}) failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            row[f"{side}_rss_bytes"], row[f"{side}_peak_bytes"] = measured["rss_bytes"], measured["peak_bytes"]
    row["rss_ratio"] = row["plain_rss_bytes"] / row["nmfx_rss_bytes"]
    print(f"{name:<18} {dtype_name:<8} memory           | plain {row['plain_rss_bytes'] / 2**20:8.1f} MiB "
          f"(peak {row['plain_peak_bytes'] / 2**20:.1f}) | nmfx {row['nmfx_rss_bytes'] / 2**20:8.1f} MiB "
          f"(peak {row['nmfx_peak_bytes'] / 2**20:.1f}) | {row['rss_ratio']:5.2f}x", flush=True)
    return row


def greedy(model, ids, new_tokens: int, static_cache: bool = False):
    """Greedy decode; ``static_cache`` (for compiled models) preallocates the KV cache so every decode step
    has the same shapes and the compiled forward is reused instead of recompiled (transformers' recipe)."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones_like(ids), **extra)


def measure(name: str, config: tuple[str, dict], plain, sparse, pattern: str, dtype: torch.dtype, args) -> list[dict]:
    rows = []
    plain_d = plain if dtype == torch.float32 else copy.deepcopy(plain).to(dtype)
    packed = nmfx.to_inference(sparse, backend="cpu", dtype=None if dtype == torch.float32 else dtype)
    if args.memory:
        rows.append(memory_row(name, *config, plain_d, packed, pattern, dtype))
    if args.compile:
        # Both models run the same forward code object, and dynamo's recompile limit (8) counts per code
        # object: every batch size / prompt length of both models needs its own entries.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for model in (plain_d, packed):
            model.forward = torch.compile(model.forward)
    vocab = plain.config.vocab_size
    common = {"model": name, "dtype": str(dtype).removeprefix("torch."), "pattern": pattern,
              "compiled": bool(args.compile), **byte_limits(plain_d, packed, pattern, dtype)}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch in args.decode_batches:
            ids = torch.randint(0, vocab, (batch, 8), generator=generator)
            same = torch.equal(greedy(plain_d, ids, args.new_tokens, args.compile), greedy(packed, ids, args.new_tokens, args.compile))
            if args.wait_quiet:
                wait_quiet(0.15, args.wait_quiet)
            t = time_interleaved({"plain": lambda: greedy(plain_d, ids, args.new_tokens, args.compile),
                                  "nmfx": lambda: greedy(packed, ids, args.new_tokens, args.compile)}, args.reps, args.reps, 0.0)
            tokens = batch * args.new_tokens
            rows.append({**common, "mode": "decode", "batch": batch, "new_tokens": args.new_tokens,
                         "plain_ms": t["plain"] * 1e3, "nmfx_ms": t["nmfx"] * 1e3, "speedup": t["plain"] / t["nmfx"],
                         "plain_tokens_per_s": tokens / t["plain"], "nmfx_tokens_per_s": tokens / t["nmfx"],
                         "same_greedy_tokens": same})
            _print(rows[-1])
        for length in args.prefill:
            ids = torch.randint(0, vocab, (1, length), generator=generator)
            agree = (plain_d(input_ids=ids).logits.argmax(-1) == packed(input_ids=ids).logits.argmax(-1)).float().mean().item()
            if args.wait_quiet:
                wait_quiet(0.15, args.wait_quiet)
            t = time_interleaved({"plain": lambda: plain_d(input_ids=ids), "nmfx": lambda: packed(input_ids=ids)}, args.reps, args.reps, 0.0)
            rows.append({**common, "mode": "prefill", "batch": 1, "tokens": length, "plain_ms": t["plain"] * 1e3,
                         "nmfx_ms": t["nmfx"] * 1e3, "speedup": t["plain"] / t["nmfx"],
                         "plain_tokens_per_s": length / t["plain"], "nmfx_tokens_per_s": length / t["nmfx"],
                         "argmax_agreement": agree})
            _print(rows[-1])
    return rows


def _print(row: dict) -> None:
    what = f"decode b{row['batch']} x{row['new_tokens']}" if row["mode"] == "decode" else f"prefill {row['tokens']}"
    print(f"{row['model']:<18} {row['dtype']:<8} {what:<16} | plain {row['plain_ms']:9.1f} ms | nmfx "
          f"{row['nmfx_ms']:9.1f} ms | {row['speedup']:5.2f}x | limit {row['byte_ratio_limit_head_dense']:.2f}x "
          f"(head 1:8: {row['byte_ratio_limit_head_sparse']:.2f}x)", flush=True)


def markdown(result: dict) -> str:
    """The README's tables for a result: speed rows, then memory rows (what ``--table`` prints)."""
    speed = ["| model | dtype | run | plain ms | nmfx ms | plain tok/s | nmfx tok/s | speed-up | byte limit | same tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    memory = ["| model | dtype | plain RSS MiB (peak) | nmfx RSS MiB (peak) | plain / nmfx |", "| --- | --- | --- | --- | --- |"]
    shown = set()
    for row in result["rows"]:
        if row["mode"] == "memory":
            memory.append(f"| {row['model']} | {row['dtype']} | {row['plain_rss_bytes'] / 2**20:.0f} "
                          f"({row['plain_peak_bytes'] / 2**20:.0f}) | {row['nmfx_rss_bytes'] / 2**20:.0f} "
                          f"({row['nmfx_peak_bytes'] / 2**20:.0f}) | {row['rss_ratio']:.2f}× |")
            continue
        key = (row["model"], row["dtype"])
        run = f"decode b{row['batch']}" if row["mode"] == "decode" else f"prefill {row['tokens']}"
        limit = (f"{row['byte_ratio_limit_head_dense']:.2f}× / {row['byte_ratio_limit_head_sparse']:.2f}×"
                 if key not in shown else "")
        same = ("yes" if row["same_greedy_tokens"] else "no") if row["mode"] == "decode" else \
            f"argmax {row['argmax_agreement'] * 100:.0f} %"
        speed.append(f"| {row['model'] if not any(k[0] == row['model'] for k in shown) else ''} | {row['dtype']} | "
                     f"{run} | {row['plain_ms']:.0f} | {row['nmfx_ms']:.0f} | {row['plain_tokens_per_s']:.0f} | "
                     f"{row['nmfx_tokens_per_s']:.0f} | {row['speedup']:.2f}× | {limit} | {same} |")
        shown.add(key)
    return "\n".join(speed) + "\n\n" + "\n".join(memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths, one rep: a smoke run")
    parser.add_argument("--pattern", default="1:8")
    parser.add_argument("--models", nargs="*", default=None, help="names from configs() (default: all)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--decode-batches", default="1,8,32")
    parser.add_argument("--prefill", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' forward")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the resident-memory rows (two fresh processes per model and dtype)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print --output's README tables (no timing)")
    parser.add_argument("--recompute-limits", action="store_true",
                        help="only rewrite --output's byte-ratio limits (no timing)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    if args.recompute_limits:
        recompute_limits(args.output, args.quick)
        return 0
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    args.prefill = [int(p) for p in args.prefill.split(",") if p]
    if args.quick:
        args.decode_batches, args.prefill, args.new_tokens, args.reps = [1, 8], [32], 4, 1
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    info = machine_info()
    print(f"machine: {describe(info)}")
    from nmfx.kernels import cpu as nmfx_cpu

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    chosen = {name: spec for name, spec in configs(args.quick).items() if not args.models or name in args.models}
    if not chosen:
        parser.error(f"--models: none of {args.models} is one of {sorted(configs(args.quick))}")
    for name, (config_name, kwargs) in chosen.items():
        plain, sparse = build(config_name, kwargs, args.pattern)
        for dtype_name in args.dtypes.split(","):
            rows += measure(name, (config_name, kwargs), plain, sparse, args.pattern, getattr(torch, dtype_name), args)
        del plain, sparse
    result = {"benchmark": "end-to-end inference: nmfx packed vs the plain model with the same masked weights",
              "machine": info, "kernel_isa": nmfx_cpu.isa(), "threads": args.threads, "quick": args.quick,
              "compiled": args.compile, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
