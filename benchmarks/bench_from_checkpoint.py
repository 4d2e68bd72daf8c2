"""Memory of ``nmfx.to_inference_from_checkpoint``: rebuilding a deployable model from a sparse run's DCP
checkpoint into a model built on the meta device, versus the size of the dense model it never holds.

    python benchmarks/bench_from_checkpoint.py            # Llama-style 1024 x 8 (419 MB of fp32 weights), 1:8
    python benchmarks/bench_from_checkpoint.py --quick    # 256 x 2

One process writes the checkpoint (a sparsified model, ``dcp.save({"model": get_model_state_dict(m)})``) and
the expected result (``nmfx.to_inference`` of the same model); a fresh process rebuilds from the checkpoint
and reads its resident memory from ``/proc/self/status`` — growth (``VmRSS``) and peak (``VmHWM``) over the
process's RSS once torch, transformers and nmfx are imported — and checks the rebuilt state dict equals the
expected one exactly. Writes ``benchmarks/results/bench_from_checkpoint.json`` with the CPU recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_from_checkpoint.json"

_CHILD = r"""
import gc, json, sys, torch, transformers, nmfx
from nmfx.bench import process_memory
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
transformers.logging.set_verbosity_error()
mode, tmp, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = transformers.LlamaConfig(**kwargs)

if mode == "save":
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    nmfx.sparsify(model, "1:8", "ste")
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp + "/ckpt")
    torch.save(nmfx.to_inference(model, backend="reference").state_dict(), tmp + "/expected.pt")
    print(json.dumps({"dense_parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
else:
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(config)
    gc.collect()
    base = process_memory()["rss_bytes"]
    nmfx.to_inference_from_checkpoint(tmp + "/ckpt", fresh, backend="reference")
    gc.collect()
    now = process_memory()
    out = {"rss_growth_bytes": now["rss_bytes"] - base, "peak_growth_bytes": now["peak_bytes"] - base}
    state = fresh.state_dict()
    out["inference_bytes"] = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
    expected = torch.load(tmp + "/expected.pt")
    out["equal_to_to_inference"] = expected.keys() == state.keys() and all(torch.equal(expected[k], state[k]) for k in expected)
    print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nmfx.bench import describe, machine_info

    width, inter, layers = (256, 704, 2) if args.quick else (1024, 2816, 8)
    kwargs = dict(hidden_size=width, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=width // 64,
                  num_key_value_heads=width // 64, vocab_size=1000, tie_word_embeddings=False)
    info = machine_info()
    print(f"machine: {describe(info)}")
    row = {"model": f"llama {width}x{layers}, vocab 1000", "pattern": "1:8", "config": kwargs}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("save", "load"):
            done = subprocess.run([sys.executable, "-c", _CHILD, mode, tmp, json.dumps(kwargs)], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(row, indent=1))
    result = {"benchmark": "nmfx.to_inference_from_checkpoint: resident memory while rebuilding from a DCP checkpoint",
              "machine": info, "quick": args.quick, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [row]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0 if row["equal_to_to_inference"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
